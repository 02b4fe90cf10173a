"""The paper's research experiments, each a sweep preset's runner (`python -m sim.sweep <name>`):
overlap (residual decay and the overlap detector), forgetting (fixed vs dynamic C over rounds),
conflict (Tables 4 and 6) and privacy (what K K^T, R K^T and Delta reveal). They drive the app in
`sim/` and never the other way round."""
