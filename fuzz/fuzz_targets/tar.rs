//! cargo-fuzz target `tar`: the body is [`juicer::fuzzing::tar`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::tar(data));
