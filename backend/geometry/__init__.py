"""Geometry shared by preprocessing, fitting and evaluation: rigid alignment, hidden-surface removal,
the pseudo-watertight height-field surface and exact signed distances. NumPy/SciPy/libigl only."""
