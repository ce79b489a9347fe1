"""Sample roles in a mixed unlearning batch (DESIGN.md, op contract 1)."""
FORGET = 0  # knowledge to remove
RETAIN = 1  # knowledge to keep
IGNORE = 2  # present in the batch, contributes nothing
