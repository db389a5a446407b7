"""Deployment: rebuild a trained network from its checkpoint, export, quantise, prune, measure, predict."""
