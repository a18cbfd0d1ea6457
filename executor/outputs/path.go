package outputs

import (
	"path"
	"strings"
	"unicode/utf8"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ResolvePath returns the path, relative to the input root, of the output
// path p that a Command declares relative to its working directory
// workingDir (itself relative to the input root). The result is cleaned:
// it has no ".", ".." or empty components.
//
// p may contain ".." components as long as the result stays inside the
// input root: Nix builders run in "build" and declare their outputs as
// "../nix/store/<hash>-<name>". ResolvePath rejects, with an
// INVALID_ARGUMENT error, empty and absolute paths, paths that leave the
// input root or name the input root itself, and paths that are not valid
// UTF-8 or contain NUL bytes. The same holds for workingDir, except that
// the empty workingDir is the input root.
//
// Resolution is lexical: "a/../b" is "b" even if "a" is a symlink. This is
// what Collect reads, as it refuses symlinks in the parent directories of
// outputs. The executor calls ResolvePath before it runs an action, to
// create the parent directories of the outputs.
func ResolvePath(workingDir, p string) (string, error) {
	if err := checkRelative("working directory", workingDir); err != nil {
		return "", err
	}
	if c := path.Clean(workingDir); c == ".." || strings.HasPrefix(c, "../") {
		return "", status.Errorf(codes.InvalidArgument, "working directory %q leaves the input root", workingDir)
	}
	if p == "" {
		return "", status.Error(codes.InvalidArgument, "output path is empty")
	}
	if err := checkRelative("output path", p); err != nil {
		return "", err
	}
	rel := path.Join(workingDir, p)
	switch {
	case rel == ".":
		return "", status.Errorf(codes.InvalidArgument, "output path %q in working directory %q names the input root", p, workingDir)
	case rel == ".." || strings.HasPrefix(rel, "../"):
		return "", status.Errorf(codes.InvalidArgument, "output path %q in working directory %q leaves the input root", p, workingDir)
	}
	return rel, nil
}

// checkRelative rejects what no relative path can be.
func checkRelative(what, p string) error {
	switch {
	case strings.HasPrefix(p, "/"):
		return status.Errorf(codes.InvalidArgument, "%s %q is absolute", what, p)
	case strings.IndexByte(p, 0) >= 0:
		return status.Errorf(codes.InvalidArgument, "%s %q contains a NUL byte", what, p)
	case !utf8.ValidString(p):
		return status.Errorf(codes.InvalidArgument, "%s %q is not valid UTF-8", what, p)
	}
	return nil
}

// want is the kind of output a Command declared.
type want uint8

const (
	wantAny  want = iota // output_paths: whatever is found
	wantFile             // legacy output_files
	wantDir              // legacy output_directories
)

// output is one declared output path.
type output struct {
	path string // as declared, relative to the working directory
	rel  string // resolved, relative to the input root
	want want
}

// declaredOutputs validates and resolves the outputs of cmd: output_paths
// if set, else output_files followed by output_directories.
func declaredOutputs(cmd *repb.Command) ([]output, error) {
	var outs []output
	add := func(ps []string, w want) error {
		for _, p := range ps {
			rel, err := ResolvePath(cmd.GetWorkingDirectory(), p)
			if err != nil {
				return err
			}
			outs = append(outs, output{path: p, rel: rel, want: w})
		}
		return nil
	}
	if len(cmd.GetOutputPaths()) > 0 {
		return outs, add(cmd.GetOutputPaths(), wantAny)
	}
	if err := add(cmd.GetOutputFiles(), wantFile); err != nil {
		return nil, err
	}
	return outs, add(cmd.GetOutputDirectories(), wantDir)
}
