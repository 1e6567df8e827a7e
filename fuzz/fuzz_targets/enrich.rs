//! cargo-fuzz target `enrich`: the body is [`juicer::fuzzing::enrich`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::enrich(data));
