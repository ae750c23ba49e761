//! broadcast (being written)
