"""Pure validation of what several services share: evaluator specs (registry and reward),
sampling parameters (rollout and trainer) and resource names. No service imports another's
internals for these; they all import from here. No grpc, no I/O."""
