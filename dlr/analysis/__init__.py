"""Reading finished runs: comparisons across runs and scaling-law fits, with their reports and plots."""
