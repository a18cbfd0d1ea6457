// Package coordinator builds whole Nix derivation graphs on a farm: it
// reads the graph, skips the outputs the farm already has, uploads the
// local sources the farm lacks, submits every ready derivation at once
// (longest remaining chain first), turns each action's outputs into store
// paths (NAR hash, references, output checks) and records them in the
// farm's path-info store, so that later builds and every client skip
// them.
//
// It is a library with no terminal or process state: `tvixfarm build`
// drives it from a laptop, and a farm can drive it server-side.
package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/nixstore"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/frontend/translate"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// Farm is where derivations are built and their outputs kept.
type Farm struct {
	// CAS holds blobs, trees and logs.
	CAS blobstore.BlobAccess
	// Execution runs actions (REAPI Execution service).
	Execution repb.ExecutionClient
	// Store is the path-info store.
	Store pathinfo.Store
	// Instance is the REAPI instance name.
	Instance string
}

// Config configures a Coordinator.
type Config struct {
	// Translate configures the translation into actions.
	Translate translate.Config
	// Jobs bounds the actions in flight (0: no bound but MaxJobs).
	Jobs int
	// KeepGoing builds what it can after a failure instead of stopping.
	KeepGoing bool
	// Local is the local Nix store the derivations and sources are read
	// from.
	Local *nixstore.Store
	// Events, if set, receives progress events; it is called from many
	// goroutines, one event at a time.
	Events func(Event)
	// LogTail is the number of log lines a build error quotes (default 10,
	// as Nix's log-lines).
	LogTail int
	// InvocationID identifies the build to the scheduler (fairness
	// between clients); default: a fresh one.
	InvocationID string
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// MaxJobs bounds the actions in flight when Config.Jobs is 0.
const MaxJobs = 4096

// Request asks for outputs of a derivation; no outputs means all.
type Request struct {
	Drv     string
	Outputs []string
}

// Result is what Build did.
type Result struct {
	// Outputs of each requested derivation, by output name.
	Outputs map[string]map[string]string
	// Counts of what happened.
	Counts Counts
	// Errors of the derivations that failed (with KeepGoing, all of
	// them; else the first).
	Errors []error
}

// Coordinator builds derivation graphs on a farm.
type Coordinator struct {
	farm Farm
	cfg  Config
	log  *slog.Logger
}

// New returns a Coordinator.
func New(farm Farm, cfg Config) *Coordinator {
	if cfg.LogTail == 0 {
		cfg.LogTail = 10
	}
	if cfg.Jobs <= 0 || cfg.Jobs > MaxJobs {
		cfg.Jobs = MaxJobs
	}
	if cfg.Translate.DigestFunction == 0 {
		cfg.Translate.DigestFunction = digest.BLAKE3
	}
	if cfg.InvocationID == "" {
		cfg.InvocationID = newID()
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Coordinator{farm: farm, cfg: cfg, log: log}
}

// node is a derivation of the graph.
type node struct {
	drv     *translate.Derivation
	want    map[string]bool // outputs someone needs
	build   bool            // must be built
	deps    []*node         // input derivations that must be built first
	parents []*node         // derivations waiting for this one
	pending int             // deps not yet built
	rank    int             // longest chain of builds from here to a request
	failed  bool
}

// build is one run of Build.
type run struct {
	c     *Coordinator
	nodes map[string]*node
	order []*node // children before parents

	mu     sync.Mutex
	infos  map[string]*storepb.PathInfo // known path infos, by path
	counts Counts
	errs   []error
}

// Build builds the requested outputs and everything they need, and
// returns their store paths. The error is non-nil if any derivation
// failed (Result.Errors lists them) or the graph could not be read.
func (c *Coordinator) Build(ctx context.Context, reqs []Request) (*Result, error) {
	r := &run{c: c, nodes: map[string]*node{}, infos: map[string]*storepb.PathInfo{}}
	if err := r.load(reqs); err != nil {
		return nil, err
	}
	if err := r.plan(ctx, reqs); err != nil {
		return nil, err
	}
	if err := r.uploadSources(ctx); err != nil {
		return nil, err
	}
	r.execute(ctx)
	res := &Result{Outputs: map[string]map[string]string{}, Counts: r.counts, Errors: r.errs}
	for _, q := range reqs {
		n := r.nodes[q.Drv]
		outs := map[string]string{}
		for name, o := range n.drv.Outputs {
			if len(q.Outputs) == 0 || slices.Contains(q.Outputs, name) {
				outs[name] = o.Path
			}
		}
		res.Outputs[q.Drv] = outs
	}
	if len(r.errs) > 0 {
		return res, r.errs[0]
	}
	return res, ctx.Err()
}

// load reads the derivation graph from the local store.
func (r *run) load(reqs []Request) error {
	var visit func(p string) error
	state := map[string]int{} // 1 visiting, 2 done
	visit = func(p string) error {
		switch state[p] {
		case 1:
			return fmt.Errorf("%s: the derivation graph has a cycle", p)
		case 2:
			return nil
		}
		state[p] = 1
		d, err := nixstore.ReadDerivation(p)
		if err != nil {
			return err
		}
		n := &node{drv: &translate.Derivation{Path: p, Derivation: d}, want: map[string]bool{}}
		r.nodes[p] = n
		inputs := slices.Sorted(maps.Keys(d.InputDerivations))
		for _, in := range inputs {
			if err := visit(in); err != nil {
				return err
			}
			for _, o := range d.InputDerivations[in] {
				if _, ok := r.nodes[in].drv.Outputs[o]; !ok {
					return fmt.Errorf("%s: input %s has no output %q", p, in, o)
				}
			}
		}
		state[p] = 2
		r.order = append(r.order, n)
		return nil
	}
	for _, q := range reqs {
		if !strings.HasSuffix(q.Drv, ".drv") {
			return fmt.Errorf("%s is not a derivation", q.Drv)
		}
		if err := visit(q.Drv); err != nil {
			return err
		}
		for _, o := range q.Outputs {
			if _, ok := r.nodes[q.Drv].drv.Outputs[o]; !ok {
				return fmt.Errorf("%s has no output %q", q.Drv, o)
			}
		}
	}
	return nil
}

// plan finds out what must be built: a derivation is built if an output
// somebody wants is not on the farm; only then are its inputs wanted.
func (r *run) plan(ctx context.Context, reqs []Request) error {
	var paths []string
	for _, n := range r.order {
		for _, o := range n.drv.Outputs {
			if o.Path != "" {
				paths = append(paths, o.Path)
			}
		}
		paths = append(paths, n.drv.InputSources...)
	}
	if err := r.fetchInfos(ctx, paths); err != nil {
		return err
	}
	for _, q := range reqs {
		n := r.nodes[q.Drv]
		if len(q.Outputs) == 0 {
			for name := range n.drv.Outputs {
				n.want[name] = true
			}
		}
		for _, o := range q.Outputs {
			n.want[o] = true
		}
	}
	for i := len(r.order) - 1; i >= 0; i-- { // parents first
		n := r.order[i]
		for name := range n.want {
			if p := n.drv.Outputs[name].Path; p == "" || r.infos[p] == nil {
				n.build = true
			}
		}
		if !n.build {
			if len(n.want) > 0 {
				r.counts.Present++
			}
			continue
		}
		if err := translate.Check(n.drv); err != nil {
			return err
		}
		r.counts.Total++
		for in, outs := range n.drv.InputDerivations {
			dep := r.nodes[in]
			for _, o := range outs {
				dep.want[o] = true
			}
		}
	}
	for _, n := range r.order { // children first
		if !n.build {
			continue
		}
		for in := range n.drv.InputDerivations {
			if dep := r.nodes[in]; dep.build {
				n.deps = append(n.deps, dep)
				dep.parents = append(dep.parents, n)
			}
		}
		n.pending = len(n.deps)
	}
	for i := len(r.order) - 1; i >= 0; i-- {
		n := r.order[i]
		for _, p := range n.parents {
			n.rank = max(n.rank, p.rank+1)
		}
	}
	return nil
}

// fetchInfos gets the farm's path infos of paths it does not know yet.
func (r *run) fetchInfos(ctx context.Context, paths []string) error {
	r.mu.Lock()
	var ask []string
	seen := map[string]bool{}
	for _, p := range paths {
		if _, ok := r.infos[p]; !ok && !seen[p] {
			ask = append(ask, p)
			seen[p] = true
		}
	}
	r.mu.Unlock()
	if len(ask) == 0 {
		return nil
	}
	got, err := r.c.farm.Store.Get(ctx, ask)
	if err != nil {
		return fmt.Errorf("querying the farm's path infos: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range ask {
		if _, ok := r.infos[p]; !ok {
			r.infos[p] = got[p] // nil: not on the farm
		}
	}
	return nil
}

// closure returns the path infos of paths and of everything they refer
// to, from the farm.
func (r *run) closure(ctx context.Context, paths []string) (map[string]*storepb.PathInfo, error) {
	out := map[string]*storepb.PathInfo{}
	todo := slices.Clone(paths)
	for len(todo) > 0 {
		if err := r.fetchInfos(ctx, todo); err != nil {
			return nil, err
		}
		var next []string
		r.mu.Lock()
		for _, p := range todo {
			if _, ok := out[p]; ok {
				continue
			}
			info := r.infos[p]
			if info == nil {
				r.mu.Unlock()
				return nil, fmt.Errorf("%s is not on the farm", p)
			}
			out[p] = info
			for _, ref := range info.References {
				if _, ok := out[ref]; !ok {
					next = append(next, ref)
				}
			}
		}
		r.mu.Unlock()
		todo = next
	}
	return out, nil
}

// uploadSources uploads the input sources of the derivations to build
// that the farm lacks, with their closures, from the local store.
func (r *run) uploadSources(ctx context.Context) error {
	var srcs []string
	seen := map[string]bool{}
	for _, n := range r.order {
		if !n.build {
			continue
		}
		for _, s := range n.drv.InputSources {
			if !seen[s] {
				seen[s] = true
				srcs = append(srcs, s)
			}
		}
	}
	for p := range r.c.cfg.Translate.SandboxPaths {
		_ = p // sandbox paths are resolved by the caller
	}
	sort.Strings(srcs)
	var missing []string
	for _, s := range srcs {
		if r.infos[s] == nil {
			missing = append(missing, s)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if r.c.cfg.Local == nil {
		return fmt.Errorf("the farm lacks %d sources, e.g. %s, and there is no local Nix store to upload them from", len(missing), missing[0])
	}
	infos, err := r.c.cfg.Local.Closure(ctx, missing)
	if err != nil {
		return fmt.Errorf("reading sources from the local store: %w", err)
	}
	var paths []string
	for _, i := range infos {
		paths = append(paths, i.Path)
	}
	if err := r.fetchInfos(ctx, paths); err != nil {
		return err
	}
	var up []nixstore.PathInfo
	for _, i := range infos {
		if r.infos[i.Path] == nil {
			up = append(up, i)
		}
	}
	t0 := time.Now()
	put, err := uploadLocal(ctx, r.c.farm, r.c.cfg.Translate.DigestFunction, up)
	if err != nil {
		return err
	}
	if err := r.c.farm.Store.Put(ctx, put); err != nil {
		return fmt.Errorf("registering sources on the farm: %w", err)
	}
	r.mu.Lock()
	for _, info := range put {
		r.infos[info.StorePath] = info
	}
	r.counts.Uploaded += len(put)
	r.mu.Unlock()
	r.c.log.Debug("uploaded sources", "paths", len(put), "took", time.Since(t0))
	r.emit(Event{Kind: Uploaded, Paths: len(put)})
	return nil
}

// execute builds the planned derivations, ready ones first, longest
// remaining chain first.
func (r *run) execute(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu    sync.Mutex
		cond  = sync.NewCond(&mu)
		ready []*node
		live  int // submitted, not finished
		left  = r.counts.Total
	)
	for _, n := range r.order {
		if n.build && n.pending == 0 {
			ready = append(ready, n)
		}
	}
	var stop bool
	var wg sync.WaitGroup
	sem := make(chan struct{}, r.c.cfg.Jobs)
	finish := func(n *node, err error) {
		mu.Lock()
		defer mu.Unlock()
		live--
		left--
		if err != nil {
			r.fail(n, err)
			if !r.c.cfg.KeepGoing {
				stop = true
				cancel()
			}
			left -= r.skipDependents(n)
		} else {
			for _, p := range n.parents {
				p.pending--
				if p.pending == 0 && !p.failed {
					ready = append(ready, p)
				}
			}
		}
		cond.Broadcast()
	}
	for _, n := range ready {
		r.emit(Event{Kind: Queued, Drv: n.drv.Path, Name: n.drv.Name()})
	}
	mu.Lock()
	for {
		for len(ready) == 0 && left > 0 && !stop && live > 0 {
			cond.Wait()
		}
		if stop || left == 0 || (len(ready) == 0 && live == 0) {
			break
		}
		// Longest remaining chain first.
		best := 0
		for i, n := range ready {
			if n.rank > ready[best].rank {
				best = i
			}
		}
		n := ready[best]
		ready = slices.Delete(ready, best, best+1)
		live++
		mu.Unlock()
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			err := r.buildOne(ctx, n)
			finish(n, err)
		}()
		mu.Lock()
	}
	mu.Unlock()
	wg.Wait()
}

// skipDependents marks everything that depends on n as failed and returns
// how many there were.
func (r *run) skipDependents(n *node) int {
	k := 0
	for _, p := range n.parents {
		if !p.failed {
			p.failed = true
			k++
			r.mu.Lock()
			r.counts.Skipped++
			r.mu.Unlock()
			k += r.skipDependents(p)
		}
	}
	return k
}

func (r *run) fail(n *node, err error) {
	n.failed = true
	r.mu.Lock()
	r.counts.Failed++
	if !errors.Is(err, context.Canceled) || len(r.errs) == 0 {
		r.errs = append(r.errs, err)
	}
	r.mu.Unlock()
	r.emit(Event{Kind: Failed, Drv: n.drv.Path, Name: n.drv.Name(), Err: err})
}

func (r *run) emit(e Event) {
	if r.c.cfg.Events == nil {
		return
	}
	r.mu.Lock()
	e.Counts = r.counts
	r.mu.Unlock()
	r.c.cfg.Events(e)
}

// WithTranslate returns c with the translation settings of a build:
// the digest function, NIX_BUILD_CORES and the sandbox paths.
func (c Config) WithTranslate(fn digest.Function, cores int, sandbox map[string]translate.File) Config {
	c.Translate.DigestFunction = fn
	c.Translate.Cores = cores
	c.Translate.SandboxPaths = sandbox
	return c
}
