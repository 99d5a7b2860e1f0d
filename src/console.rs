//! What the user sees on the terminal, written so that it never panics: `mmc run | head -1`
//! closes standard output after one line, and training must not die of that.

use indicatif::ProgressBar;
use std::io::Write;

/// Standard output and error for progress and results.
#[derive(Debug)]
pub struct Console {
    /// False once writing to standard output failed (a closed pipe): later lines are dropped
    /// and the work goes on.
    stdout_open: bool,
    /// The progress bar on standard error while one is drawn: every line is printed with the
    /// bar lifted (`ProgressBar::suspend`) so that it never cuts through the bar.
    bar: Option<ProgressBar>,
}

impl Default for Console {
    fn default() -> Self {
        Console {
            stdout_open: true,
            bar: None,
        }
    }
}

impl Console {
    /// Routes later lines around `bar` (until [`Console::clear_bar`]).
    pub fn set_bar(&mut self, bar: ProgressBar) {
        self.bar = Some(bar);
    }

    /// Clears the bar from the terminal; later lines print plainly.
    pub fn clear_bar(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    /// Runs `f` with the bar, if any, lifted off the terminal.
    fn around_bar<R>(bar: &Option<ProgressBar>, f: impl FnOnce() -> R) -> R {
        match bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    /// A result line on standard output.
    pub fn out(&mut self, line: &str) {
        if self.stdout_open {
            let ok = Self::around_bar(&self.bar, || {
                let mut o = std::io::stdout().lock();
                writeln!(o, "{line}").and_then(|_| o.flush()).is_ok()
            });
            self.stdout_open = ok;
        }
    }

    /// A progress or warning line on standard error.
    pub fn err(&self, line: &str) {
        Self::around_bar(&self.bar, || {
            let _ = writeln!(std::io::stderr(), "{line}");
        });
    }
}
