// Package nixstore is the frontend's access to the local Nix store of the
// machine `tvixfarm build` runs on: reading derivations, querying path
// infos of sources to upload, and registering the farm's outputs
// (nix-store --import) with garbage-collector roots, as nix-build does.
// It runs Nix's own commands, so the store's locks and database are
// handled by Nix.
package nixstore

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/nix-community/go-nix/pkg/derivation"
	"github.com/nix-community/go-nix/pkg/nixhash"
)

// Store is a local Nix store.
type Store struct {
	// Dir is the store directory, /nix/store.
	Dir string
}

// Local returns the local store, or an error if Nix is not installed.
func Local() (*Store, error) {
	if _, err := exec.LookPath("nix-store"); err != nil {
		return nil, errors.New("no local Nix: nix-store is not on PATH")
	}
	return &Store{Dir: "/nix/store"}, nil
}

// ReadDerivation parses the .drv file at path.
func ReadDerivation(path string) (*derivation.Derivation, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d, err := derivation.ReadDerivation(bufio.NewReader(f))
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	// go-nix (v0.0.0-20250101154619) unescapes only env values; Nix
	// escapes every ATerm string.
	d.Builder = unescape(d.Builder)
	d.Platform = unescape(d.Platform)
	for i, a := range d.Arguments {
		d.Arguments[i] = unescape(a)
	}
	for k, v := range d.Env {
		if u := unescape(k); u != k {
			delete(d.Env, k)
			d.Env[u] = v
		}
	}
	return d, nil
}

// unescape undoes the escaping of an ATerm string: \n, \r, \t and a
// backslash before any other byte, which stands for itself.
func unescape(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '\\' && i+1 < len(s) {
			i++
			switch s[i] {
			case 'n':
				c = '\n'
			case 'r':
				c = '\r'
			case 't':
				c = '\t'
			default:
				c = s[i]
			}
		}
		b.WriteByte(c)
	}
	return b.String()
}

// PathInfo is what the local store knows about a path.
type PathInfo struct {
	Path       string   `json:"path"`
	NarHash    string   `json:"narHash"` // "sha256:<nix32>"
	NarSize    uint64   `json:"narSize"`
	References []string `json:"references"`
	Deriver    string   `json:"deriver"`
	CA         string   `json:"ca"`
	Valid      *bool    `json:"valid"`
}

// NarSHA256 returns the raw NAR hash.
func (p *PathInfo) NarSHA256() ([]byte, error) {
	h, err := nixhash.ParseAny(p.NarHash, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: NAR hash %q: %w", p.Path, p.NarHash, err)
	}
	if h.Algo() != nixhash.SHA256 {
		return nil, fmt.Errorf("%s: NAR hash %q is not SHA-256", p.Path, p.NarHash)
	}
	return h.Digest(), nil
}

// Closure returns the path infos of paths and everything they refer to,
// recursively. A path that is not valid in the local store is an error.
func (s *Store) Closure(ctx context.Context, paths []string) ([]PathInfo, error) {
	if len(paths) == 0 {
		return nil, nil
	}
	args := append([]string{"--extra-experimental-features", "nix-command", "path-info", "--json", "--recursive"}, paths...)
	out, err := run(ctx, nil, "nix", args...)
	if err != nil {
		return nil, err
	}
	var infos []PathInfo
	if err := json.Unmarshal(out, &infos); err != nil {
		return nil, fmt.Errorf("nix path-info: %w", err)
	}
	for _, i := range infos {
		if i.Valid != nil && !*i.Valid {
			return nil, fmt.Errorf("%s is not in the local Nix store", i.Path)
		}
		sort.Strings(i.References)
	}
	return infos, nil
}

// Valid returns which of paths are valid in the local store.
func (s *Store) Valid(ctx context.Context, paths []string) (map[string]bool, error) {
	m := map[string]bool{}
	for len(paths) > 0 {
		n := min(len(paths), 1000)
		args := append([]string{"--check-validity", "--print-invalid"}, paths[:n]...)
		out, err := run(ctx, nil, "nix-store", args...)
		if err != nil {
			return nil, err
		}
		for _, p := range paths[:n] {
			m[p] = true
		}
		for _, p := range strings.Fields(string(out)) {
			m[p] = false
		}
		paths = paths[n:]
	}
	return m, nil
}

// Export is one path of an import: its NAR is written by WriteNAR.
type Export struct {
	Path       string
	References []string
	Deriver    string
	WriteNAR   func(w io.Writer) error
}

// Import registers paths in the local store with `nix-store --import`,
// which checks each NAR against its path and makes it valid with its
// references and deriver. Paths must be in an order where references come
// first (or are already valid).
func (s *Store) Import(ctx context.Context, paths []Export) error {
	if len(paths) == 0 {
		return nil
	}
	pr, pw := io.Pipe()
	cmd := exec.CommandContext(ctx, "nix-store", "--import")
	cmd.Stdin = pr
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("nix-store --import: %w", err)
	}
	werr := make(chan error, 1)
	go func() {
		bw := bufio.NewWriterSize(pw, 1<<20)
		err := writeExport(bw, paths)
		if err == nil {
			err = bw.Flush()
		}
		pw.CloseWithError(err)
		werr <- err
	}()
	err := cmd.Wait()
	pr.CloseWithError(errors.New("nix-store exited"))
	if e := <-werr; e != nil && err == nil {
		return fmt.Errorf("nix-store --import: writing: %w", e)
	}
	if err != nil {
		return fmt.Errorf("nix-store --import: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// writeExport writes Nix's export format: per path, 1, the NAR, the magic
// "NIXE", the path, its references, its deriver and 0 (no signature);
// then 0.
func writeExport(w io.Writer, paths []Export) error {
	for _, p := range paths {
		if err := writeUint(w, 1); err != nil {
			return err
		}
		if err := p.WriteNAR(w); err != nil {
			return fmt.Errorf("%s: %w", p.Path, err)
		}
		if err := writeUint(w, 0x4558494e); err != nil {
			return err
		}
		if err := writeString(w, p.Path); err != nil {
			return err
		}
		if err := writeUint(w, uint64(len(p.References))); err != nil {
			return err
		}
		for _, r := range p.References {
			if err := writeString(w, r); err != nil {
				return err
			}
		}
		if err := writeString(w, p.Deriver); err != nil {
			return err
		}
		if err := writeUint(w, 0); err != nil {
			return err
		}
	}
	return writeUint(w, 0)
}

func writeUint(w io.Writer, n uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], n)
	_, err := w.Write(b[:])
	return err
}

func writeString(w io.Writer, s string) error {
	if err := writeUint(w, uint64(len(s))); err != nil {
		return err
	}
	if _, err := io.WriteString(w, s); err != nil {
		return err
	}
	if pad := (8 - len(s)%8) % 8; pad > 0 {
		_, err := w.Write(make([]byte, pad))
		return err
	}
	return nil
}

// AddRoot makes link an indirect garbage-collector root of path, as
// nix-build's ./result symlinks are.
func (s *Store) AddRoot(ctx context.Context, path, link string) error {
	abs, err := filepath.Abs(link)
	if err != nil {
		return err
	}
	_, err = run(ctx, nil, "nix-store", "--realise", path, "--add-root", abs, "--indirect")
	return err
}

func run(ctx context.Context, stdin io.Reader, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = stdin
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Settings are the local Nix settings that change what a builder sees.
type Settings struct {
	// Cores is the `cores` setting, NIX_BUILD_CORES.
	Cores int
	// SandboxPaths is `sandbox-paths`: "target=source" or "path", with an
	// optional "?" suffix for paths that may be missing.
	SandboxPaths []string
}

// ReadSettings reads the local Nix settings (nix show-config).
func ReadSettings(ctx context.Context) (Settings, error) {
	out, err := run(ctx, nil, "nix", "--extra-experimental-features", "nix-command", "show-config", "--json")
	if err != nil {
		return Settings{}, err
	}
	var cfg struct {
		Cores struct {
			Value int `json:"value"`
		} `json:"cores"`
		SandboxPaths struct {
			Value []string `json:"value"`
		} `json:"sandbox-paths"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		return Settings{}, fmt.Errorf("nix show-config: %w", err)
	}
	return Settings{Cores: cfg.Cores.Value, SandboxPaths: cfg.SandboxPaths.Value}, nil
}
