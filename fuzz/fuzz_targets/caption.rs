//! cargo-fuzz target `caption`: the body is [`juicer::fuzzing::caption`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::caption(data));
