"""One module per kind: BeamCustomer, BeamApiKey, BeamPriceList. Each has ``register()``."""
