-- Which resource manages a customer ("BeamCustomer/<name>"; '' for customers created through
-- the API). Two BeamCustomers of one namespace naming the same customerId would otherwise
-- both reconcile it, and deleting either would close it for both: the first owner keeps
-- it until it is closed, a second one is refused (CUSTOMER_EXISTS).
ALTER TABLE customers ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT '';
