#![no_std]
// Empty: lets observer/build.rs depend on this crate so cargo rebuilds on change.
