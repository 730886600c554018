"""The vector store: Chroma client helpers, the node's Chroma server, the shared-store decision, preflight."""
