"""Compiler passes of fxsketch, run in this order: trace → saved → liveness → candidates → solve → rewrite."""
