//! Replays compiled programs: kernel launches and library calls over one activation arena,
//! one scratch region and one library workspace, all allocated once, with state and data
//! tensors bound in place.
//!
//! Nothing is allocated per step but the small tensors of a program's non-state outputs
//! (the loss, the gradient norm); the pointer tables are reused, and the threads are one
//! persistent pool.

use mmc_codegen::compiled::{Callee, CompiledProgram, Loc};
use mmc_codegen::library::Workspace;
use mmc_codegen::native::{KernelEntry, KernelLibrary, NativeError};
use mmc_ir::Tensor;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Why a compiled program could not run.
#[derive(Debug, thiserror::Error)]
pub enum CompiledError {
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error("program `{program}` reads `{name}`, which is neither state nor data of this step")]
    Unbound { program: String, name: String },
    #[error("program `{program}` reads `{name}` as {want}, but it is {got}")]
    BoundType {
        program: String,
        name: String,
        want: String,
        got: String,
    },
    #[error("program `{program}` updates `{name}`, which is not a state tensor")]
    NotState { program: String, name: String },
    #[error("the plan has no compiled program `{0}`")]
    NoProgram(String),
    #[error("cannot allocate {0} bytes for the compiled programs' buffers")]
    Alloc(u64),
    #[error("a thread pool of {threads} threads: {message}")]
    Pool { threads: usize, message: String },
    /// Compiled steps that do not fit their own buffers (a damaged or hand-made plan):
    /// refused before anything runs.
    #[error("the plan's compiled program `{program}` is inconsistent: {message}")]
    Invalid { program: String, message: String },
    #[error("program `{program}`, node {node}: {error}")]
    Step {
        program: String,
        node: u32,
        error: NativeError,
    },
}

/// A zeroed, 64-byte aligned allocation.
struct Region {
    ptr: *mut u8,
    bytes: usize,
}

impl Region {
    fn new(bytes: u64) -> Result<Region, CompiledError> {
        let size = usize::try_from(bytes).map_err(|_| CompiledError::Alloc(bytes))?;
        if size == 0 {
            return Ok(Region {
                ptr: std::ptr::NonNull::<u64>::dangling().as_ptr().cast(),
                bytes: 0,
            });
        }
        let layout = Layout::from_size_align(size, 64).map_err(|_| CompiledError::Alloc(bytes))?;
        // SAFETY: a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(CompiledError::Alloc(bytes));
        }
        Ok(Region { ptr, bytes: size })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.bytes, 64)) }
        }
    }
}

// SAFETY: the regions are plain memory owned by the runner; kernels touch them only inside
// `run`, which holds the runner mutably.
unsafe impl Send for Region {}

/// Compiled programs with their kernel library, buffers and threads.
pub struct CompiledRunner {
    library: KernelLibrary,
    programs: Vec<CompiledProgram>,
    arena: Region,
    scratch: Region,
    /// Where the library calls pack their operands, sized for the largest call on the pool.
    workspace: Workspace,
    pool: rayon::ThreadPool,
    bound: Vec<*mut u8>,
    args: Vec<*mut u8>,
    /// Per program, per step: nanoseconds and runs, when profiling.
    profile: Option<Vec<Vec<(u64, u64)>>>,
}

/// The time one step of a compiled program took, summed over the runs since profiling began:
/// what `mmc run --profile` prints, by op.
#[derive(Clone, Debug, PartialEq)]
pub struct StepTime {
    pub program: String,
    pub step: usize,
    pub node: u32,
    /// A kernel's name or a library call's description.
    pub callee: String,
    pub seconds: f64,
    pub runs: u64,
}

// SAFETY: the raw pointer tables are rebuilt at each run from the tensors of that run.
unsafe impl Send for CompiledRunner {}

impl CompiledRunner {
    /// Loads the kernel library at `library` (refused unless its SHA-256 is `sha256`) and
    /// allocates the largest arena, scratch region and library workspace of `programs` once.
    ///
    /// # Safety
    /// The library is native code that will run in this process: it must be the one compiled
    /// with `programs` (a plan from an untrusted source must never be run).
    pub unsafe fn new(
        library: &Path,
        sha256: &str,
        kernels: Vec<KernelEntry>,
        programs: Vec<CompiledProgram>,
        threads: usize,
    ) -> Result<CompiledRunner, CompiledError> {
        for p in &programs {
            validate(p, &kernels).map_err(|message| CompiledError::Invalid {
                program: p.name.clone(),
                message,
            })?;
        }
        // SAFETY: the caller's contract.
        let library = unsafe { KernelLibrary::load(library, sha256, kernels) }?;
        let (arena, scratch) = mmc_codegen::compiled::shared_regions(&programs);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| CompiledError::Pool {
                threads,
                message: e.to_string(),
            })?;
        let threads = pool.current_num_threads();
        let workspace = programs
            .iter()
            .flat_map(|p| &p.steps)
            .filter_map(|s| match &s.callee {
                Callee::Library(call) => Some(call.workspace_bytes(threads)),
                Callee::Kernel(_) => None,
            })
            .max()
            .unwrap_or(0);
        Ok(CompiledRunner {
            library,
            programs,
            arena: Region::new(arena)?,
            scratch: Region::new(scratch)?,
            workspace: Workspace::new(workspace).ok_or(CompiledError::Alloc(workspace as u64))?,
            pool,
            bound: Vec::new(),
            args: Vec::new(),
            profile: None,
        })
    }

    /// Starts timing every step (a clock read around each, so a little slower): see
    /// [`CompiledRunner::profile`].
    pub fn start_profile(&mut self) {
        self.profile = Some(
            self.programs
                .iter()
                .map(|p| vec![(0, 0); p.steps.len()])
                .collect(),
        );
    }

    /// The time of every step run since [`CompiledRunner::start_profile`], slowest first;
    /// empty when not profiling.
    pub fn profile(&self) -> Vec<StepTime> {
        let Some(prof) = &self.profile else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (p, times) in self.programs.iter().zip(prof) {
            for (i, (step, &(ns, runs))) in p.steps.iter().zip(times).enumerate() {
                if runs == 0 {
                    continue;
                }
                out.push(StepTime {
                    program: p.name.clone(),
                    step: i,
                    node: step.node,
                    callee: match &step.callee {
                        Callee::Kernel(k) => self.library.kernels().nth(*k as usize).map_or_else(
                            || format!("kernel {k}"),
                            |e| format!("kernel {}", e.name),
                        ),
                        Callee::Library(call) => call.to_string(),
                    },
                    seconds: ns as f64 * 1e-9,
                    runs,
                });
            }
        }
        out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        out
    }

    /// Bytes of the activation arena, the scratch region and the library workspace.
    pub fn buffer_bytes(&self) -> u64 {
        (self.arena.bytes + self.scratch.bytes + self.workspace.bytes()) as u64
    }

    /// Bytes of the library workspace alone.
    pub fn workspace_bytes(&self) -> u64 {
        self.workspace.bytes() as u64
    }

    /// Runs program `name` over `state` (read and updated in place) and `data` (read);
    /// returns the outputs that are not state updates.
    pub fn run(
        &mut self,
        name: &str,
        state: &mut HashMap<String, Tensor>,
        data: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, CompiledError> {
        let pi = self
            .programs
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| CompiledError::NoProgram(name.to_string()))?;
        let p = &self.programs[pi];
        self.bound.clear();
        for (n, dtype, shape) in &p.bound {
            let check = |t: &Tensor| -> Result<(), CompiledError> {
                if t.dtype() != *dtype || t.shape() != shape.as_slice() {
                    return Err(CompiledError::BoundType {
                        program: p.name.clone(),
                        name: n.clone(),
                        want: format!("{dtype} {shape:?}"),
                        got: format!("{} {:?}", t.dtype(), t.shape()),
                    });
                }
                Ok(())
            };
            let ptr = match state.get_mut(n) {
                Some(t) => {
                    check(t)?;
                    t.as_mut_ptr()
                }
                None => match data.get(n) {
                    // Data is only read: no step writes a bound tensor that is not state.
                    Some(t) => {
                        check(t)?;
                        t.as_ptr().cast_mut()
                    }
                    None => {
                        return Err(CompiledError::Unbound {
                            program: p.name.clone(),
                            name: n.clone(),
                        })
                    }
                },
            };
            self.bound.push(ptr);
        }
        for o in &p.outputs {
            if let Some(i) = o.update {
                let n = &p.bound[i as usize].0;
                if !state.contains_key(n) {
                    return Err(CompiledError::NotState {
                        program: p.name.clone(),
                        name: n.clone(),
                    });
                }
            }
        }
        let (arena, scratch) = (self.arena.ptr, self.scratch.ptr);
        let mut times = self.profile.as_mut().map(|t| &mut t[pi]);
        for (si, step) in p.steps.iter().enumerate() {
            let started = times.as_ref().map(|_| std::time::Instant::now());
            self.args.clear();
            for a in &step.args {
                // SAFETY: `validate` checked every location against its region at load.
                self.args
                    .push(unsafe { resolve(*a, arena, scratch, &self.bound) });
            }
            let result = match &step.callee {
                // SAFETY: the arguments are the buffers the compiler planned for the kernel.
                Callee::Kernel(k) => unsafe {
                    self.library.launch(*k as usize, &self.args, &self.pool)
                },
                // SAFETY: as for kernels; the call checks its data-dependent offsets itself.
                Callee::Library(call) => {
                    unsafe { call.execute(&self.args, &mut self.workspace, &self.pool) }
                        .map_err(|e| NativeError::Library(e.to_string()))
                }
            };
            result.map_err(|error| CompiledError::Step {
                program: p.name.clone(),
                node: step.node,
                error,
            })?;
            if let (Some(t), Some(s)) = (times.as_mut(), started) {
                t[si].0 += s.elapsed().as_nanos() as u64;
                t[si].1 += 1;
            }
        }
        let mut out = BTreeMap::new();
        for o in &p.outputs {
            let bytes = o.shape.iter().product::<usize>() * o.dtype.size_bytes();
            // SAFETY: as for the step arguments.
            let src = unsafe { resolve(o.loc, arena, scratch, &self.bound) };
            match o.update {
                Some(i) => {
                    let dst = self.bound[i as usize];
                    if dst != src {
                        // SAFETY: both hold `bytes` bytes of the output's type (checked at
                        // binding); the arena and a state tensor never overlap.
                        unsafe { std::ptr::copy_nonoverlapping(src, dst, bytes) };
                    }
                }
                None => {
                    // SAFETY: `bytes` bytes of the output's type.
                    let raw = unsafe { std::slice::from_raw_parts(src, bytes) };
                    let t = Tensor::from_le_bytes(o.dtype, o.shape.clone(), raw)
                        .expect("sizes come from the type");
                    out.insert(o.name.clone(), t);
                }
            }
        }
        Ok(out)
    }
}

/// The address of a location.
///
/// # Safety
/// The location lies inside its region (see `validate`) and `bound` holds the run's pointers.
unsafe fn resolve(loc: Loc, arena: *mut u8, scratch: *mut u8, bound: &[*mut u8]) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        match loc {
            Loc::Arena(o) => arena.add(o as usize),
            Loc::Scratch(o) => scratch.add(o as usize),
            Loc::Bound(i) => bound[i as usize],
        }
    }
}

fn bytes_of(dtype: mmc_ir::DType, shape: &[usize]) -> u64 {
    (shape.iter().product::<usize>() * dtype.size_bytes()) as u64
}

/// Checks that every step of `p` launches a kernel of the table with as many buffers as it
/// takes, and that every buffer lies inside its region or bound tensor, so that replaying the
/// steps stays inside the memory the runner owns.
fn validate(p: &CompiledProgram, kernels: &[KernelEntry]) -> Result<(), String> {
    let fits = |loc: Loc, need: u64, what: &str| -> Result<(), String> {
        let ok = match loc {
            Loc::Arena(o) => o.checked_add(need).is_some_and(|e| e <= p.arena_bytes),
            Loc::Scratch(o) => o.checked_add(need).is_some_and(|e| e <= p.scratch_bytes),
            Loc::Bound(i) => p
                .bound
                .get(i as usize)
                .is_some_and(|(_, d, s)| bytes_of(*d, s) >= need),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("{what}: {need} bytes at {loc:?} do not fit"))
        }
    };
    for (n, step) in p.steps.iter().enumerate() {
        match &step.callee {
            Callee::Kernel(k) => {
                let entry = kernels
                    .get(*k as usize)
                    .ok_or_else(|| format!("step {n} launches kernel {k}, not in the table"))?;
                if entry.buffers.len() != step.args.len() {
                    return Err(format!(
                        "step {n}: kernel `{}` takes {} buffers, the step passes {}",
                        entry.name,
                        entry.buffers.len(),
                        step.args.len()
                    ));
                }
                for (a, (d, s)) in step.args.iter().zip(&entry.buffers) {
                    fits(*a, bytes_of(*d, s), &format!("step {n}"))?;
                }
            }
            Callee::Library(call) => {
                call.check().map_err(|e| format!("step {n}: {e}"))?;
                let need = call.buffer_bytes();
                if need.len() != step.args.len() {
                    return Err(format!(
                        "step {n}: a library call takes {} buffers, the step passes {}",
                        need.len(),
                        step.args.len()
                    ));
                }
                for (a, b) in step.args.iter().zip(need) {
                    fits(*a, b, &format!("step {n}"))?;
                }
            }
        }
    }
    for o in &p.outputs {
        fits(
            o.loc,
            bytes_of(o.dtype, &o.shape),
            &format!("output `{}`", o.name),
        )?;
        if let Some(i) = o.update {
            fits(
                Loc::Bound(i),
                bytes_of(o.dtype, &o.shape),
                &format!("update `{}`", o.name),
            )?;
        }
    }
    Ok(())
}
