//! cargo-fuzz target `loader_state`: the body is [`juicer::fuzzing::loader_state`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::loader_state(data));
