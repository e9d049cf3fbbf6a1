"""LightningDataModules and the dataset registry entries (one class per dataset)."""
