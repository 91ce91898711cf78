//! The `presence-gateway` binary: parses the command line and hands over to
//! the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    presence_gateway::cli::main(presence_gateway::cli::Cli::parse())
}
