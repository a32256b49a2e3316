"""Workflows: the stages in order (`pipeline`), experiments (`ablate`, `bench`) and machine checks (`doctor`)."""
