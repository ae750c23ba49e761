//! streamctl (being written)
