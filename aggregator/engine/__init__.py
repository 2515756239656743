"""The round engine: the sans-IO state machine that runs rounds (admission, intake, commits,
phases, upload grants, the agent registry, the round table in memory) and the ROUTER
service that wraps it in a socket loop. It may import `protocol`, `aggregator.errors`,
`aggregator.ops` (the config), `aggregator.store` and the method interface of
`aggregator.methods`, never a method's own folder, the tier or the local job.
"""
