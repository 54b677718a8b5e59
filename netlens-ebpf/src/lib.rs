//! Lets cargo track this crate as a build dependency of netlens; the
//! programs themselves are the `netlens` binary target (src/main.rs).
#![no_std]
