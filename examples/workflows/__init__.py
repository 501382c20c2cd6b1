"""The workflows: pruning by selection order, winning tickets, growing."""
