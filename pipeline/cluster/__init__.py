"""Ranks and jobs: distributed start-up, local launch of ranks, the per-step control plane (preemption,
lost peers) and the run lock."""
