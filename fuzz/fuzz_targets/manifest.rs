//! cargo-fuzz target `manifest`: the body is [`juicer::fuzzing::manifest`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::manifest(data));
