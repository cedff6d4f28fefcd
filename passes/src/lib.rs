//! Compiler passes over the IR: canonicalization, fusion, weight repacking, scheduling and memory planning.
