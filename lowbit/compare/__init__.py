"""`lowbit compare`: every method × format on the user's own model, as a table and a Pareto plot."""
