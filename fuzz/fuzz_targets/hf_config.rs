//! cargo-fuzz target `hf_config`: the body is [`juicer::fuzzing::hf_config`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::hf_config(data));
