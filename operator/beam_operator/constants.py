"""One home for the operator's names: API group, finalizer, annotation prefix, Secret keys.

The Secret data keys are an interface: the Helm chart's NOTES.txt and users' Deployments
read ``api-key`` from the Secret a BeamApiKey names; never rename them.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "beam.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
CUSTOMERS: Final = "beamcustomers"
API_KEYS: Final = "beamapikeys"
PRICE_LISTS: Final = "beampricelists"

# Kopf's persistence: the finalizer and the annotations that hold handler progress and
# the last handled spec (`beam.dev/last-handled-configuration`).
FINALIZER: Final = "beam.dev/finalizer"
ANNOTATION_PREFIX: Final = "beam.dev"
EVENT_COMPONENT: Final = "beam-operator"

# The Secret a BeamApiKey owns.
SECRET_KEY_API_KEY: Final = "api-key"  # noqa: S105 (a data key, not a secret)
SECRET_KEY_KEY_ID: Final = "key-id"  # noqa: S105
SECRET_KEY_TENANT: Final = "tenant"  # noqa: S105
SECRET_NAME_SUFFIX: Final = "-key"  # noqa: S105
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_API_KEY: Final = "beam.dev/api-key"

# Bounds (STYLE: a limit on everything).
RECONCILE_RETRIES: Final = 20  # then the handler fails; a spec change or restart retries
DELETE_RETRIES: Final = 720  # closing/revoking must not be skipped: ~12 h at the 60 s cap
MAX_RETRY_DELAY_SECONDS: Final = 60.0
HANDLER_TIMEOUT_SECONDS: Final = 300.0
KUBE_REQUEST_TIMEOUT_SECONDS: Final = 15.0
CONDITION_MESSAGE_MAX: Final = 4096
