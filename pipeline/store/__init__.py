"""The vector store: Chroma client helpers, the node's Chroma server, the shared-store decision, preflight, the
node-local copy of a store (staging), the token sent to a user's own Chroma server."""
