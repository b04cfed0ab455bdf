"""Early stopping of one request: the generation session, side requests, accounting, ensembles."""
