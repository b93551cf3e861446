"""Data sets: the bundled default, the files users pass by path, fixed random subsets."""
