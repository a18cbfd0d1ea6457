// Package nixtest runs real Nix (Debian's nix-bin 2.8, sandbox on, local
// store, as root) as the oracle of the end-to-end tests: they build the
// derivations of the corpus in frontend/testdata/nix with both nix-build and
// tvixfarm and compare outputs, NAR hashes and references bit for bit.
//
// Busybox skips a test when Nix is not set up (scripts/nix-setup.sh does it),
// or fails it if the environment variable TVIXFARM_REQUIRE_NIX is "1", so CI
// cannot silently stop comparing against Nix.
package nixtest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// RequireEnv is the environment variable that, set to "1", turns a missing
// or broken Nix setup into a test failure instead of a skip.
const RequireEnv = "TVIXFARM_REQUIRE_NIX"

// BusyboxPathFile is where scripts/nix-setup.sh records the busybox store
// path (the `busybox` argument of the corpus).
const BusyboxPathFile = "/etc/nix/tvixfarm-busybox-path"

// ReferenceBusybox is the busybox store path of the reference setup (Debian's
// busybox-static 1:1.35.0-4+deb12u1+b1). Another busybox gives another path
// and changes every output hash of the corpus.
const ReferenceBusybox = "/nix/store/s1y78axx3ky46cgzv60pyry4irrlv0pl-busybox"

// setupTimeout bounds scripts/nix-setup.sh, which may have to apt-get install.
const setupTimeout = 10 * time.Minute

// nixCommand is the flag every `nix` (not nix-store, nix-instantiate) call
// needs, whatever nix.conf says.
var nixCommand = []string{"--extra-experimental-features", "nix-command"}

// PathInfo is what the local Nix store knows about one valid store path,
// from `nix path-info --json`.
type PathInfo struct {
	// Path is the full store path.
	Path string
	// NarHash is "sha256:<nix32>", the form of `nix-store -q --hash` and of
	// the Nix database (nix path-info --json of 2.8 prints SRI; it is converted).
	NarHash string
	// NarSize is the size of the NAR serialisation in bytes.
	NarSize uint64
	// References are full store paths, sorted; a self-reference is included.
	References []string
	// Deriver is the .drv path that built it, or "".
	Deriver string
	// CA is the content address ("fixed:r:sha256:<nix32>" and the like), or
	// "" for input-addressed paths.
	CA string
}

// RealiseError is the error of a failed Realise.
type RealiseError struct {
	Drv string
	// Stderr is everything `nix-store --realise` wrote to stderr: the
	// builder's output and Nix's "error: ..." message.
	Stderr string
	Err    error // the exit status
}

func (e *RealiseError) Error() string {
	msg := e.Stderr
	if i := strings.Index(msg, "error:"); i >= 0 {
		msg = msg[i:]
	}
	return fmt.Sprintf("nix-store --realise %s: %v: %s", e.Drv, e.Err, strings.TrimSpace(msg))
}

func (e *RealiseError) Unwrap() error { return e.Err }

// Case is one attribute of the corpus, frontend/testdata/nix/default.nix.
type Case struct {
	// Attr is the attribute name (an attrset of derivations for
	// fixedOutput and envProbe, a derivation otherwise).
	Attr string
	// WantError is empty if Nix builds the case, and otherwise a substring
	// of the error Nix gives.
	WantError string
	// Slow marks the case (large) that writes about 216 MB.
	Slow bool
	// Bench marks cases for benchmarks only (graph1000), not for the
	// comparison suite.
	Bench bool
}

// Cases lists every attribute of the corpus with Nix's outcome; README.md
// next to the corpus has the same table with what each case checks.
var Cases = []Case{
	{Attr: "trivial"},
	{Attr: "multiOutput"},
	{Attr: "multiOutputCycle", WantError: "cycle detected in build of"},
	{Attr: "chain"},
	{Attr: "wide"},
	{Attr: "fixedOutput"},
	{Attr: "fodMismatch", WantError: "hash mismatch in fixed-output derivation"},
	{Attr: "passAsFile"},
	{Attr: "structuredAttrs"},
	{Attr: "placeholders"},
	{Attr: "selfReference"},
	{Attr: "fileTypes"},
	{Attr: "large", Slow: true},
	{Attr: "unicode"},
	{Attr: "nonUtf8Name"},
	{Attr: "allowedReferencesOk"},
	{Attr: "allowedReferencesFail", WantError: "is not allowed to refer to the following paths"},
	{Attr: "allowedRequisitesOk"},
	{Attr: "allowedRequisitesFail", WantError: "is not allowed to refer to the following paths"},
	{Attr: "disallowedReferencesOk"},
	{Attr: "disallowedReferencesFail", WantError: "is not allowed to refer to the following paths"},
	{Attr: "disallowedRequisitesOk"},
	{Attr: "disallowedRequisitesFail", WantError: "is not allowed to refer to the following paths"},
	{Attr: "builderFails", WantError: "failed with exit code 3"},
	{Attr: "missingOutput", WantError: "failed to produce output path for output 'out'"},
	{Attr: "network"},
	{Attr: "exportReferencesGraph"},
	{Attr: "toFile"},
	{Attr: "requiredSystemFeatures", WantError: "with features {tvixfarm-no-such-feature} is required to build"},
	{Attr: "envProbe"},
	{Attr: "graph1000", Bench: true},
}

// sourceDir is the directory of this file, in the source tree.
func sourceDir() string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		panic("nixtest: runtime.Caller failed")
	}
	return filepath.Dir(file)
}

// CorpusDir returns the absolute path of frontend/testdata/nix.
func CorpusDir() string {
	return filepath.Join(sourceDir(), "..", "..", "testdata", "nix")
}

// CorpusFile returns the absolute path of the corpus' default.nix.
func CorpusFile() string { return filepath.Join(CorpusDir(), "default.nix") }

// setupScript returns the absolute path of scripts/nix-setup.sh.
func setupScript() string {
	return filepath.Join(sourceDir(), "..", "..", "..", "scripts", "nix-setup.sh")
}

var setup struct {
	once sync.Once
	path string
	err  error
}

// Busybox returns the busybox store path to pass as the corpus' `busybox`
// argument. It skips tb unless nix-build is installed and Nix is set up
// (fails it instead if TVIXFARM_REQUIRE_NIX=1). If the setup has not been
// done and the test runs as root, it runs scripts/nix-setup.sh, at most
// once per process.
func Busybox(tb testing.TB) string {
	tb.Helper()
	if _, err := exec.LookPath("nix-build"); err != nil {
		skipOrFail(tb, "nix-build not installed (run scripts/nix-setup.sh as root)")
	}
	setup.once.Do(func() { setup.path, setup.err = ensureSetup() })
	if setup.err != nil {
		skipOrFail(tb, setup.err.Error())
	}
	return setup.path
}

func skipOrFail(tb testing.TB, msg string) {
	tb.Helper()
	if os.Getenv(RequireEnv) == "1" {
		tb.Fatalf("nixtest: %s (and %s=1)", msg, RequireEnv)
	}
	tb.Skipf("nixtest: %s", msg)
}

// ensureSetup returns the recorded busybox path if it is still in the
// store, and otherwise runs scripts/nix-setup.sh (as root only).
func ensureSetup() (string, error) {
	if p, err := recordedBusybox(); err == nil {
		return p, nil
	}
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("Nix is not set up (%s missing) and only root can run scripts/nix-setup.sh", BusyboxPathFile)
	}
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "/bin/sh", setupScript())
	cmd.Stderr = &stderr
	if _, err := cmd.Output(); err != nil {
		return "", fmt.Errorf("scripts/nix-setup.sh: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return recordedBusybox()
}

// recordedBusybox reads BusyboxPathFile and checks that the path is there.
func recordedBusybox() (string, error) {
	b, err := os.ReadFile(BusyboxPathFile)
	if err != nil {
		return "", err
	}
	p := strings.TrimSpace(string(b))
	if !strings.HasPrefix(p, "/nix/store/") {
		return "", fmt.Errorf("%s: %q is not a store path", BusyboxPathFile, p)
	}
	if _, err := os.Stat(filepath.Join(p, "bin", "busybox")); err != nil {
		return "", err
	}
	return p, nil
}

// run runs a Nix command and returns its stdout; a failure's error carries
// the stderr.
func run(ctx context.Context, name string, args ...string) (stdout, stderr string, err error) {
	var o, e bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout = &o
	cmd.Stderr = &e
	err = cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(e.String()))
	}
	return o.String(), e.String(), err
}

// Instantiate evaluates attrs of the Nix file (all of its top-level
// derivations if attrs is empty) with args passed as --argstr, and returns
// the .drv paths, in Nix's order, without duplicates. An attribute that is
// an attrset or list of derivations gives one .drv per derivation.
func Instantiate(ctx context.Context, file string, attrs []string, args map[string]string) ([]string, error) {
	argv := []string{file}
	for _, a := range attrs {
		argv = append(argv, "-A", a)
	}
	keys := make([]string, 0, len(args))
	for k := range args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		argv = append(argv, "--argstr", k, args[k])
	}
	out, _, err := run(ctx, "nix-instantiate", argv...)
	if err != nil {
		return nil, err
	}
	var drvs []string
	seen := map[string]bool{}
	for _, l := range strings.Fields(out) {
		// nix-instantiate prints drv!output when an attribute selects a
		// non-default output (multiOutput.dev).
		d, _, _ := strings.Cut(l, "!")
		if !seen[d] {
			seen[d] = true
			drvs = append(drvs, d)
		}
	}
	if len(drvs) == 0 {
		return nil, fmt.Errorf("nix-instantiate %s: no derivations", strings.Join(argv, " "))
	}
	return drvs, nil
}

// Realise builds drv with `nix-store --realise` (sandbox on) unless its
// outputs are already valid, and returns the PathInfo of every output by
// output name. log is what nix-store wrote to stderr (the builder's output,
// as Nix renders it, and on failure Nix's error message; empty if nothing
// was built). On failure err is a *RealiseError. For the raw log Nix
// stored, use BuildLog.
func Realise(ctx context.Context, drv string) (map[string]PathInfo, string, error) {
	var o, e bytes.Buffer
	cmd := exec.CommandContext(ctx, "nix-store", "--realise", drv,
		"--option", "sandbox", "true", "--option", "sandbox-fallback", "false")
	cmd.Stdout = &o
	cmd.Stderr = &e
	if err := cmd.Run(); err != nil {
		return nil, e.String(), &RealiseError{Drv: drv, Stderr: e.String(), Err: err}
	}
	log := e.String()
	outs, err := Outputs(ctx, drv)
	if err != nil {
		return nil, log, err
	}
	paths := make([]string, 0, len(outs))
	for _, p := range outs {
		paths = append(paths, p)
	}
	infos, err := QueryPathInfo(ctx, paths...)
	if err != nil {
		return nil, log, err
	}
	res := make(map[string]PathInfo, len(outs))
	for name, p := range outs {
		info, ok := infos[p]
		if !ok {
			return nil, log, fmt.Errorf("realise %s: output %s (%s) is not valid after the build", drv, name, p)
		}
		res[name] = info
	}
	return res, log, nil
}

// Outputs returns the output paths of drv by output name, from `nix
// show-derivation`, or for floating content-addressed outputs (no path in
// the .drv) from `nix realisation info` once they are built.
func Outputs(ctx context.Context, drv string) (map[string]string, error) {
	out, _, err := run(ctx, "nix", append(nixCommand, "show-derivation", drv)...)
	if err != nil {
		return nil, err
	}
	var shown map[string]struct {
		Outputs map[string]struct {
			Path string `json:"path"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal([]byte(out), &shown); err != nil {
		return nil, fmt.Errorf("nix show-derivation %s: %w", drv, err)
	}
	d, ok := shown[drv]
	if !ok || len(d.Outputs) == 0 {
		return nil, fmt.Errorf("nix show-derivation %s: no outputs", drv)
	}
	res := make(map[string]string, len(d.Outputs))
	floating := false
	for name, o := range d.Outputs {
		if o.Path == "" {
			floating = true
			continue
		}
		res[name] = o.Path
	}
	if !floating {
		return res, nil
	}
	out, _, err = run(ctx, "nix", append(nixCommand, "realisation", "info", "--json", drv)...)
	if err != nil {
		return nil, err
	}
	var realisations []struct {
		ID      string `json:"id"`
		OutPath string `json:"outPath"`
	}
	if err := json.Unmarshal([]byte(out), &realisations); err != nil {
		return nil, fmt.Errorf("nix realisation info %s: %w", drv, err)
	}
	for _, r := range realisations {
		_, name, ok := strings.Cut(r.ID, "!")
		if !ok {
			continue
		}
		p := r.OutPath
		if !strings.HasPrefix(p, "/") {
			p = "/nix/store/" + p
		}
		res[name] = p
	}
	for name := range d.Outputs {
		if _, ok := res[name]; !ok {
			return nil, fmt.Errorf("%s: no realisation of output %s", drv, name)
		}
	}
	return res, nil
}

// QueryPathInfo returns the PathInfo of each valid path by path, from `nix
// path-info --json`; invalid paths are left out.
func QueryPathInfo(ctx context.Context, paths ...string) (map[string]PathInfo, error) {
	res := map[string]PathInfo{}
	if len(paths) == 0 {
		return res, nil
	}
	// path-info fails as a whole on an invalid path: ask only for valid ones.
	valid := make([]string, 0, len(paths))
	for _, p := range paths {
		if _, _, err := run(ctx, "nix-store", "--check-validity", p); err == nil {
			valid = append(valid, p)
		}
	}
	if len(valid) == 0 {
		return res, nil
	}
	out, _, err := run(ctx, "nix", append(append(nixCommand, "path-info", "--json"), valid...)...)
	if err != nil {
		return nil, err
	}
	var infos []struct {
		Path       string   `json:"path"`
		NarHash    string   `json:"narHash"`
		NarSize    uint64   `json:"narSize"`
		References []string `json:"references"`
		Deriver    string   `json:"deriver"`
		CA         string   `json:"ca"`
		Valid      *bool    `json:"valid"`
	}
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		return nil, fmt.Errorf("nix path-info --json: %w", err)
	}
	for _, i := range infos {
		if i.Valid != nil && !*i.Valid {
			continue
		}
		h, err := NixNarHash(i.NarHash)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", i.Path, err)
		}
		refs := append([]string{}, i.References...)
		sort.Strings(refs)
		res[i.Path] = PathInfo{Path: i.Path, NarHash: h, NarSize: i.NarSize, References: refs, Deriver: i.Deriver, CA: i.CA}
	}
	return res, nil
}

// BuildLog returns the build log of drv as Nix stored it (`nix-store
// --read-log`): the builder's stdout and stderr merged, bytes unchanged.
// Nix keeps logs of failed builds too.
func BuildLog(ctx context.Context, drv string) (string, error) {
	out, _, err := run(ctx, "nix-store", "--read-log", drv)
	return out, err
}

// aliveRE matches nix-store --delete's refusal to delete one path.
var aliveRE = regexp.MustCompile(`(?i)cannot delete path '([^']+)' since it is still alive`)

// Delete removes paths from the local store with `nix-store --delete`, so
// that the next build has to rebuild (or fetch) them. Paths that are still
// alive (a GC root or a valid referrer outside paths keeps them) are left
// alone, and paths that are not in the store are ignored.
func Delete(ctx context.Context, paths ...string) error {
	left := append([]string{}, paths...)
	// nix-store stops at the first live path; drop it and go on.
	for len(left) > 0 {
		_, stderr, err := run(ctx, "nix-store", append([]string{"--delete"}, left...)...)
		if err == nil {
			return nil
		}
		m := aliveRE.FindStringSubmatch(stderr)
		if m == nil || ctx.Err() != nil {
			return err
		}
		n := len(left)
		left = removeString(left, m[1])
		if len(left) == n {
			return err
		}
	}
	return nil
}

func removeString(s []string, x string) []string {
	out := s[:0]
	for _, v := range s {
		if v != x {
			out = append(out, v)
		}
	}
	return out
}

// NixNarHash converts a NAR hash as Nix prints it ("sha256-<base64>" SRI,
// "sha256:<base16>" or "sha256:<nix32>") to "sha256:<nix32>".
func NixNarHash(h string) (string, error) {
	var raw []byte
	var err error
	switch {
	case strings.HasPrefix(h, "sha256-"):
		raw, err = base64.StdEncoding.DecodeString(strings.TrimPrefix(h, "sha256-"))
	case strings.HasPrefix(h, "sha256:") && len(h) == len("sha256:")+52:
		return h, nil
	case strings.HasPrefix(h, "sha256:") && len(h) == len("sha256:")+64:
		raw, err = hex.DecodeString(strings.TrimPrefix(h, "sha256:"))
	default:
		return "", fmt.Errorf("unknown NAR hash format %q", h)
	}
	if err == nil && len(raw) != 32 {
		err = errors.New("not 32 bytes")
	}
	if err != nil {
		return "", fmt.Errorf("NAR hash %q: %v", h, err)
	}
	return "sha256:" + Nix32(raw), nil
}

// nix32Alphabet is Nix's base-32 alphabet (no e, o, u, t).
const nix32Alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

// Nix32 encodes b in Nix's base-32, as in store paths and `nix-hash --base32`.
func Nix32(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	n := (len(b)*8-1)/5 + 1
	out := make([]byte, n)
	for i := n - 1; i >= 0; i-- {
		bit := i * 5
		c, j := bit/8, uint(bit%8)
		v := uint(b[c]) >> j
		if c+1 < len(b) {
			v |= uint(b[c+1]) << (8 - j)
		}
		out[n-1-i] = nix32Alphabet[v&0x1f]
	}
	return string(out)
}
