"""The ambiguity study: does STAR reduce the harm of ambiguous annotation? (README.md here)

  config.py    the study's grid and the training config of its cells
  cells.py     the variants, the cells in the order they run, each cell's config
  scoring.py   a cell's NMEs, covariance-to-tangent statistics and error split on the test split
  tables.py    statistics over seeds and the markdown tables
  plots.py     the figures
  study.py     running the cells (each an ordinary training run), the outputs, --partial, --replot
  run.py       the command: python -m projects.ambiguity.run
"""
