//! What the user sees on the terminal, written so that it never panics: `mmc run | head -1`
//! closes standard output after one line, and training must not die of that.

use std::io::Write;

/// Standard output and error for progress and results.
#[derive(Debug)]
pub struct Console {
    /// False once writing to standard output failed (a closed pipe): later lines are dropped
    /// and the work goes on.
    stdout_open: bool,
}

impl Default for Console {
    fn default() -> Self {
        Console { stdout_open: true }
    }
}

impl Console {
    /// A result line on standard output.
    pub fn out(&mut self, line: &str) {
        if self.stdout_open {
            let mut o = std::io::stdout().lock();
            if writeln!(o, "{line}").and_then(|_| o.flush()).is_err() {
                self.stdout_open = false;
            }
        }
    }

    /// A progress or warning line on standard error.
    pub fn err(&self, line: &str) {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}
