"""Examples of dessilbi_jax: the main job, its workflows and their pieces."""
