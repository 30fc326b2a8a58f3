"""The shipped demo: a synthetic shapes dataset with ground-truth masks and a small trained CNN."""
