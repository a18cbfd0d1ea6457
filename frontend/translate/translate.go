// Package translate turns a Nix derivation into a REAPI action that, run
// by a worker that chroots into its input root (tvixfarm's executor, or a
// stock worker such as Buildbarn's bb_runner), gives the builder the
// environment of Nix 2.8's sandbox: the input closure at /nix/store,
// /build with the passAsFile, structured-attrs and exportReferencesGraph
// files, /etc/passwd, /etc/group and /etc/hosts with Nix's contents, an
// empty /tmp, and /bin/sh when configured; Nix's environment variables;
// outputs at ../nix/store/<hash>-<name> from the working directory build.
//
// Everything in the action derives from the derivation and the contents of
// its inputs, so the same derivation built twice, by anyone, has the same
// action digest and hits the action cache.
package translate

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/nix-community/go-nix/pkg/derivation"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/digest"
	"tvixfarm/frontend/pathinfo"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// Platform property names of Nix actions (the executor's names).
const (
	PropNixSystem   = "nix-system"
	PropNixFeatures = "nix-features"
	PropNetwork     = "network"
	PropPTY         = "nix-pty"
)

// StoreDir is the Nix store, and where it appears in the input root.
const StoreDir = "/nix/store"

// The /etc files of Nix's sandbox (nix-sandbox.md §3).
const (
	EtcPasswd = "root:x:0:0:Nix build user:/build:/noshell\n" +
		"nixbld:x:1000:100:Nix build user:/build:/noshell\n" +
		"nobody:x:65534:65534:Nobody:/:/noshell\n"
	EtcGroup = "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n"
	EtcHosts = "127.0.0.1 localhost\n::1 localhost\n"
)

// File is a file of the CAS placed into every input root by a sandbox
// path (Nix's sandbox-paths).
type File struct {
	Digest     digest.Digest
	Executable bool
}

// Config says how derivations are translated.
type Config struct {
	// DigestFunction of the action and of everything it names.
	DigestFunction digest.Function
	// Cores is NIX_BUILD_CORES, Nix's `cores` setting (0: all).
	Cores int
	// SandboxPaths are files placed at absolute paths of the input root
	// (e.g. "/bin/sh"), as Nix's sandbox-paths bind-mounts them.
	SandboxPaths map[string]File
	// ImpureEnv returns the value of an impureEnvVars variable of a
	// fixed-output derivation (the client's environment); nil means none.
	ImpureEnv func(name string) (string, bool)
	// Platform properties added to every action, e.g. for a backend that
	// needs them.
	ExtraPlatform map[string]string
}

// Action is a translated derivation.
type Action struct {
	Action  *repb.Action
	Command *repb.Command
	// Digest is the Action's digest.
	Digest digest.Digest
	// Blobs are every blob the action names that the translation created
	// (the Action, the Command, the input root's Directories and small
	// files); the input store paths' trees are not included.
	Blobs map[digest.Digest][]byte
	// Outputs maps output names to store paths; OutputPaths maps the
	// REAPI output paths (relative to the working directory) to output
	// names.
	Outputs     map[string]string
	OutputPaths map[string]string
	// Fixed is set for a fixed-output derivation.
	Fixed bool
}

// Derivation is a parsed derivation with its store path.
type Derivation struct {
	Path string
	*derivation.Derivation
}

// Placeholder returns Nix's placeholder for output name ("/" + nix32 of
// the SHA-256 of "nix-output:<name>").
func Placeholder(output string) string {
	h := sha256.Sum256([]byte("nix-output:" + output))
	return "/" + nixbase32.EncodeToString(h[:])
}

// ErrUnsupported marks derivations the farm refuses to build.
var ErrUnsupported = errors.New("not supported yet")

// Check returns an error for derivations that cannot be translated:
// content-addressed or impure ones, builtin builders.
func Check(d *Derivation) error {
	for name, o := range d.Outputs {
		if o.Path == "" {
			return fmt.Errorf("%s: output %q has no path (a content-addressed derivation, __contentAddressed): %w", d.Path, name, ErrUnsupported)
		}
	}
	if strings.HasPrefix(d.Builder, "builtin:") {
		return fmt.Errorf("%s: builder %q (Nix's builtin builders): %w", d.Path, d.Builder, ErrUnsupported)
	}
	if d.Env["__impure"] == "1" {
		return fmt.Errorf("%s: impure derivations: %w", d.Path, ErrUnsupported)
	}
	return nil
}

// IsFixed reports whether d is a fixed-output derivation.
func IsFixed(d *derivation.Derivation) bool {
	o, ok := d.Outputs["out"]
	return ok && len(d.Outputs) == 1 && o.HashAlgorithm != ""
}

// Translate turns d into an action. closure holds the path infos of every
// path of the input closure: the input sources and the used outputs of
// the input derivations, closed under references.
func Translate(cfg Config, d *Derivation, closure map[string]*storepb.PathInfo) (*Action, error) {
	if err := Check(d); err != nil {
		return nil, err
	}
	t := &translation{cfg: cfg, d: d, closure: closure, blobs: map[digest.Digest][]byte{}, build: &repb.Directory{}}
	return t.run()
}

type translation struct {
	cfg     Config
	d       *Derivation
	closure map[string]*storepb.PathInfo
	blobs   map[digest.Digest][]byte
	build   *repb.Directory // the build/ directory
	rewrite *strings.Replacer
}

func (t *translation) run() (*Action, error) {
	d := t.d
	a := &Action{Outputs: map[string]string{}, OutputPaths: map[string]string{}, Fixed: IsFixed(d.Derivation)}
	var pairs []string
	var outputPaths []string
	for name, o := range d.Outputs {
		a.Outputs[name] = o.Path
		pairs = append(pairs, Placeholder(name), o.Path)
		op := ".." + o.Path
		a.OutputPaths[op] = name
		outputPaths = append(outputPaths, op)
	}
	sort.Strings(outputPaths)
	t.rewrite = strings.NewReplacer(pairs...)

	env, err := t.env(a.Fixed)
	if err != nil {
		return nil, err
	}
	args := make([]string, 0, 1+len(d.Arguments))
	args = append(args, d.Builder)
	for _, s := range d.Arguments {
		args = append(args, t.rewrite.Replace(s))
	}
	cmd := &repb.Command{
		Arguments:        args,
		WorkingDirectory: "build",
		OutputPaths:      outputPaths,
		Platform:         t.platform(a.Fixed),
	}
	names := make([]string, 0, len(env))
	for k := range env {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		cmd.EnvironmentVariables = append(cmd.EnvironmentVariables, &repb.Command_EnvironmentVariable{Name: k, Value: env[k]})
	}
	root, err := t.inputRoot()
	if err != nil {
		return nil, err
	}
	cmdDigest := t.put(cmd)
	act := &repb.Action{
		CommandDigest:   cmdDigest.Proto(),
		InputRootDigest: root.Proto(),
		Platform:        cmd.Platform,
	}
	a.Action, a.Command = act, cmd
	a.Digest = t.put(act)
	a.Blobs = t.blobs
	return a, nil
}

// env returns the builder's environment, as Nix 2.8's initEnv builds it.
func (t *translation) env(fixed bool) (map[string]string, error) {
	d := t.d
	env := map[string]string{
		"PATH":            "/path-not-set",
		"HOME":            "/homeless-shelter",
		"NIX_STORE":       StoreDir,
		"NIX_BUILD_CORES": strconv.Itoa(t.cfg.Cores),
	}
	if js, ok := d.Env["__json"]; ok {
		if err := t.structuredAttrs(js); err != nil {
			return nil, fmt.Errorf("%s: structured attrs: %w", d.Path, err)
		}
		env["NIX_ATTRS_JSON_FILE"] = "/build/.attrs.json"
		env["NIX_ATTRS_SH_FILE"] = "/build/.attrs.sh"
	} else {
		passAsFile := map[string]bool{}
		for _, n := range strings.Fields(d.Env["passAsFile"]) {
			passAsFile[n] = true
		}
		for k, v := range d.Env {
			if !passAsFile[k] {
				env[k] = t.rewrite.Replace(v)
				continue
			}
			h := sha256.Sum256([]byte(k))
			fn := ".attr-" + nixbase32.EncodeToString(h[:])
			t.addBuildFile(fn, []byte(t.rewrite.Replace(v)))
			env[k+"Path"] = "/build/" + fn
		}
		if err := t.exportReferencesGraph(); err != nil {
			return nil, err
		}
	}
	for _, k := range []string{"NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"} {
		env[k] = "/build"
	}
	if fixed {
		env["NIX_OUTPUT_CHECKED"] = "1"
		if t.cfg.ImpureEnv != nil {
			for _, k := range strings.Fields(d.Env["impureEnvVars"]) {
				if v, ok := t.cfg.ImpureEnv(k); ok {
					env[k] = v
				}
			}
		}
	}
	env["NIX_LOG_FD"] = "2"
	env["TERM"] = "xterm-256color"
	return env, nil
}

// exportReferencesGraph writes the files the exportReferencesGraph
// attribute asks for ("name1 path1 name2 path2 ..."): the closure of each
// path in Nix's validity-registration format.
func (t *translation) exportReferencesGraph() error {
	f := strings.Fields(t.d.Env["exportReferencesGraph"])
	if len(f)%2 != 0 {
		return fmt.Errorf("%s: exportReferencesGraph: odd number of words", t.d.Path)
	}
	for i := 0; i < len(f); i += 2 {
		name, p := f[i], f[i+1]
		if name == "" || name == "." || name == ".." || strings.Contains(name, "/") {
			return fmt.Errorf("%s: exportReferencesGraph: invalid file name %q", t.d.Path, name)
		}
		closure, err := t.exportReferences([]string{p})
		if err != nil {
			return err
		}
		var b strings.Builder
		for _, c := range closure {
			info := t.closure[c]
			b.WriteString(c + "\n\n")
			b.WriteString(strconv.Itoa(len(info.References)) + "\n")
			for _, r := range info.References {
				b.WriteString(r + "\n")
			}
		}
		t.addBuildFile(name, []byte(b.String()))
	}
	return nil
}

// exportReferences returns the closure of paths, which must be in the
// input closure, sorted as Nix sorts store paths (by base name).
func (t *translation) exportReferences(paths []string) ([]string, error) {
	seen := map[string]bool{}
	var walk func(string) error
	walk = func(p string) error {
		if seen[p] {
			return nil
		}
		info, ok := t.closure[p]
		if !ok {
			return fmt.Errorf("%s: exportReferencesGraph: %s is not an input of the derivation", t.d.Path, p)
		}
		seen[p] = true
		for _, r := range info.References {
			if err := walk(r); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range paths {
		p = storePathOf(p)
		if err := walk(p); err != nil {
			return nil, err
		}
	}
	out := make([]string, 0, len(seen))
	for p := range seen {
		out = append(out, p)
	}
	sort.Strings(out)
	return out, nil
}

// storePathOf returns the store path that p (a store path or a path
// inside one) belongs to.
func storePathOf(p string) string {
	rest, ok := strings.CutPrefix(p, StoreDir+"/")
	if !ok {
		return p
	}
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		rest = rest[:i]
	}
	return StoreDir + "/" + rest
}

func (t *translation) platform(fixed bool) *repb.Platform {
	props := map[string]string{
		PropNixSystem: t.d.Platform,
		PropPTY:       "true",
	}
	if fs := t.features(); len(fs) > 0 {
		props[PropNixFeatures] = strings.Join(fs, ",")
	}
	if fixed {
		props[PropNetwork] = "true"
	}
	for k, v := range t.cfg.ExtraPlatform {
		props[k] = v
	}
	p := &repb.Platform{}
	for k, v := range props {
		p.Properties = append(p.Properties, &repb.Platform_Property{Name: k, Value: v})
	}
	slices.SortFunc(p.Properties, func(a, b *repb.Platform_Property) int { return strings.Compare(a.Name, b.Name) })
	return p
}

// features returns requiredSystemFeatures, sorted and unique.
func (t *translation) features() []string {
	var fs []string
	if js, ok := t.d.Env["__json"]; ok {
		fs = structuredFeatures(js)
	} else {
		fs = strings.Fields(t.d.Env["requiredSystemFeatures"])
	}
	sort.Strings(fs)
	return slices.Compact(fs)
}

func (t *translation) addBuildFile(name string, data []byte) {
	d := digest.Compute(t.cfg.DigestFunction, data)
	t.blobs[d] = data
	t.build.Files = append(t.build.Files, &repb.FileNode{Name: name, Digest: d.Proto()})
}

// put marshals m deterministically, records it as a blob and returns its
// digest.
func (t *translation) put(m proto.Message) digest.Digest {
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic(err) // cannot fail for these messages
	}
	d := digest.Compute(t.cfg.DigestFunction, data)
	t.blobs[d] = data
	return d
}

// inputRoot builds the input root and returns its digest.
func (t *translation) inputRoot() (digest.Digest, error) {
	store := &repb.Directory{}
	paths := make([]string, 0, len(t.closure))
	for p := range t.closure {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		info := t.closure[p]
		name := path.Base(p)
		n := info.GetNode()
		if n.GetKind() != storepb.Node_SYMLINK && n.GetDigestFunction() != t.cfg.DigestFunction.String() {
			return digest.Digest{}, fmt.Errorf("%s: input %s is stored with digest function %s, the action uses %s", t.d.Path, p, n.GetDigestFunction(), t.cfg.DigestFunction)
		}
		switch n.GetKind() {
		case storepb.Node_DIRECTORY:
			d, _, err := pathinfo.NodeDigest(n)
			if err != nil {
				return digest.Digest{}, fmt.Errorf("%s: input %s: %w", t.d.Path, p, err)
			}
			store.Directories = append(store.Directories, &repb.DirectoryNode{Name: name, Digest: d.Proto()})
		case storepb.Node_FILE:
			d, _, err := pathinfo.NodeDigest(n)
			if err != nil {
				return digest.Digest{}, fmt.Errorf("%s: input %s: %w", t.d.Path, p, err)
			}
			store.Files = append(store.Files, &repb.FileNode{Name: name, Digest: d.Proto(), IsExecutable: n.Executable})
		case storepb.Node_SYMLINK:
			store.Symlinks = append(store.Symlinks, &repb.SymlinkNode{Name: name, Target: n.Target})
		default:
			return digest.Digest{}, fmt.Errorf("%s: input %s has no tree", t.d.Path, p)
		}
	}
	nix := &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "store", Digest: t.put(store).Proto()}}}

	etc := &repb.Directory{}
	for _, f := range []struct{ name, data string }{{"group", EtcGroup}, {"hosts", EtcHosts}, {"passwd", EtcPasswd}} {
		d := digest.Compute(t.cfg.DigestFunction, []byte(f.data))
		t.blobs[d] = []byte(f.data)
		etc.Files = append(etc.Files, &repb.FileNode{Name: f.name, Digest: d.Proto()})
	}
	slices.SortFunc(t.build.Files, func(a, b *repb.FileNode) int { return strings.Compare(a.Name, b.Name) })
	for i := 1; i < len(t.build.Files); i++ {
		if t.build.Files[i].Name == t.build.Files[i-1].Name {
			return digest.Digest{}, fmt.Errorf("%s: two files named %q in /build", t.d.Path, t.build.Files[i].Name)
		}
	}

	root := newTree()
	root.dir("build", t.put(t.build))
	root.dir("etc", t.put(etc))
	root.dir("nix", t.put(nix))
	root.dir("tmp", t.put(&repb.Directory{}))
	for p, f := range t.cfg.SandboxPaths {
		if err := root.file(p, f); err != nil {
			return digest.Digest{}, fmt.Errorf("sandbox path %s: %w", p, err)
		}
	}
	return root.finish(t), nil
}

func nix32(b []byte) string { return nixbase32.EncodeToString(b) }
