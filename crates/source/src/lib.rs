//! source (being written)
