package tvixbuild

import (
	"bytes"
	"fmt"
	"strings"

	"tvixfarm/cas/castore"
	buildpb "tvixfarm/proto/tvix/build/v1"
)

// Validate checks a BuildRequest as the Rust build service does
// (tvix-protocols.md §4.2), except that outputs need not be sorted (Snix
// sends them in output-name order) and the reasons are ours.
func Validate(r *buildpb.BuildRequest) error {
	var prev []byte
	for i, in := range r.GetInputs() {
		if err := castore.ValidateNode(in, false); err != nil {
			return fmt.Errorf("inputs[%d]: %w", i, err)
		}
		name := castore.NodeName(in)
		if i > 0 && bytes.Compare(prev, name) >= 0 {
			return fmt.Errorf("inputs[%d]: %q is not after %q (names must be sorted and unique)", i, name, prev)
		}
		prev = name
	}
	if len(r.GetCommandArgs()) == 0 {
		return fmt.Errorf("command_args: empty")
	}
	if err := cleanRelative(r.GetWorkingDir()); err != nil {
		return fmt.Errorf("working_dir: %w", err)
	}
	if err := cleanRelative(r.GetInputsDir()); err != nil {
		return fmt.Errorf("inputs_dir: %w", err)
	}
	for i, p := range r.GetScratchPaths() {
		if err := cleanRelative(p); err != nil || p == "" {
			return fmt.Errorf("scratch_paths[%d] %q: %v", i, p, cmpErr(err))
		}
		if i > 0 && r.ScratchPaths[i-1] > p {
			return fmt.Errorf("scratch_paths[%d]: %q is not sorted", i, p)
		}
	}
	if len(r.GetOutputs()) == 0 {
		return fmt.Errorf("outputs: empty")
	}
	seen := map[string]bool{}
	for i, p := range r.GetOutputs() {
		if err := cleanRelative(p); err != nil || p == "" {
			return fmt.Errorf("outputs[%d] %q: %v", i, p, cmpErr(err))
		}
		if seen[p] {
			return fmt.Errorf("outputs[%d]: %q twice", i, p)
		}
		seen[p] = true
	}
	for i, e := range r.GetEnvironmentVars() {
		switch {
		case e.GetKey() == "":
			return fmt.Errorf("environment_vars[%d]: empty key", i)
		case strings.ContainsAny(e.GetKey(), "=\x00"):
			return fmt.Errorf("environment_vars[%d]: key %q contains '=' or NUL", i, e.GetKey())
		case bytes.IndexByte(e.GetValue(), 0) >= 0:
			return fmt.Errorf("environment_vars[%d]: the value of %s contains NUL", i, e.GetKey())
		case i > 0 && r.EnvironmentVars[i-1].GetKey() >= e.GetKey():
			return fmt.Errorf("environment_vars[%d]: %s is not after %s (keys must be sorted and unique)", i, e.GetKey(), r.EnvironmentVars[i-1].GetKey())
		}
	}
	if c := r.GetConstraints(); c != nil {
		if c.GetSystem() == "" {
			return fmt.Errorf("constraints.system: empty")
		}
		for i, p := range c.GetAvailableRoPaths() {
			if !strings.HasPrefix(p, "/") || cleanRelative(p[1:]) != nil || p == "/" {
				return fmt.Errorf("constraints.available_ro_paths[%d]: %q is not a clean absolute path", i, p)
			}
		}
	}
	for i, f := range r.GetAdditionalFiles() {
		if err := cleanRelative(f.GetPath()); err != nil || f.GetPath() == "" {
			return fmt.Errorf("additional_files[%d] %q: %v", i, f.GetPath(), cmpErr(err))
		}
		if i > 0 && r.AdditionalFiles[i-1].GetPath() >= f.GetPath() {
			return fmt.Errorf("additional_files[%d]: %q is not after %q (paths must be sorted and unique)", i, f.GetPath(), r.AdditionalFiles[i-1].GetPath())
		}
	}
	for i, n := range r.GetRefscanNeedles() {
		if n == "" {
			return fmt.Errorf("refscan_needles[%d]: empty", i)
		}
	}
	return nil
}

func cmpErr(err error) any {
	if err == nil {
		return "empty"
	}
	return err
}

// cleanRelative reports whether p is a clean relative path: no leading
// '/', no empty, "." or ".." components. The empty path is clean.
func cleanRelative(p string) error {
	if p == "" {
		return nil
	}
	if strings.HasPrefix(p, "/") {
		return fmt.Errorf("absolute path %q", p)
	}
	for _, c := range strings.Split(p, "/") {
		switch c {
		case "":
			return fmt.Errorf("empty component in %q", p)
		case ".", "..":
			return fmt.Errorf("%q component in %q", c, p)
		}
	}
	return nil
}
