"""The rank side of serving: what one model part (the whole model in one process, or one
pipeline stage x expert-parallel rank) does with the step plans the driver sends: its paged
cache and page tables (runner), one column's step (column), sampling, speculative
verification and the MTP drafter. Never imports the Ray runtime; reads the driver's plain
data types (ds3dist.core.plan, params, options) and calls nothing of the driver."""
