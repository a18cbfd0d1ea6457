// Package eval turns Nix expressions into derivations. Evaluator is the
// seam where the language evaluator can be replaced (the seed design wants
// every component swappable, "up to and including the language
// evaluator"); NixInstantiate runs Nix's nix-instantiate, and a Tvix or
// Snix evaluator can be added beside it.
package eval

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// Expr is what to evaluate: a .nix file or directory, with attribute
// paths and arguments, as nix-build takes them.
type Expr struct {
	// Path is a .nix file or a directory holding default.nix.
	Path string
	// Attrs are attribute paths (-A); none means the whole expression.
	Attrs []string
	// Args are Nix expressions passed as function arguments (--arg);
	// ArgStrs are strings (--argstr).
	Args, ArgStrs map[string]string
}

// Target is a derivation to build, with the outputs asked for (none:
// all of them).
type Target struct {
	Drv     string
	Outputs []string
}

// Evaluator evaluates expressions to derivations, which it writes to the
// local store.
type Evaluator interface {
	Evaluate(ctx context.Context, e Expr) ([]Target, error)
}

// NixInstantiate evaluates with nix-instantiate.
type NixInstantiate struct {
	// Program is the nix-instantiate binary (default: from PATH).
	Program string
}

// Evaluate runs nix-instantiate and parses the .drv paths it prints
// ("path.drv" or "path.drv!output").
func (n NixInstantiate) Evaluate(ctx context.Context, e Expr) ([]Target, error) {
	prog := n.Program
	if prog == "" {
		prog = "nix-instantiate"
	}
	args := []string{}
	for k, v := range e.Args {
		args = append(args, "--arg", k, v)
	}
	for k, v := range e.ArgStrs {
		args = append(args, "--argstr", k, v)
	}
	for _, a := range e.Attrs {
		args = append(args, "-A", a)
	}
	args = append(args, "--", e.Path)
	cmd := exec.CommandContext(ctx, prog, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return nil, fmt.Errorf("evaluating %s: %s", e.Path, msg)
	}
	var ts []Target
	for _, line := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		if line == "" {
			continue
		}
		drv, out, _ := strings.Cut(line, "!")
		if !strings.HasSuffix(drv, ".drv") {
			return nil, fmt.Errorf("evaluating %s: nix-instantiate printed %q, not a derivation", e.Path, line)
		}
		t := Target{Drv: drv}
		if out != "" {
			t.Outputs = strings.Split(out, ",")
		}
		ts = append(ts, t)
	}
	if len(ts) == 0 {
		return nil, fmt.Errorf("evaluating %s: no derivations", e.Path)
	}
	return ts, nil
}
