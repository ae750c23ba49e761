//! lb (being written)
