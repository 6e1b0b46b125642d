"""The control plane: tenants, credentials, flags, budgets, audit and executions."""
