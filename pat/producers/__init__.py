"""Other ways to make members than Prune and Tune: the LR pool, StarSSE and SharpBalance."""
