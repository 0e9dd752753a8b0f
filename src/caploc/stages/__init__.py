"""Study stages (one module per verb)."""
