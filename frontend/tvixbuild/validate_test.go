package tvixbuild

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	buildpb "tvixfarm/proto/tvix/build/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

var emptyDigest = make([]byte, 32)

func fileNode(name string) *castorepb.Node {
	return &castorepb.Node{Node: &castorepb.Node_File{File: &castorepb.FileNode{Name: []byte(name), Digest: emptyDigest}}}
}

// nixRequest is what tvix-glue sends for a derivation (§5.2).
func nixRequest() *buildpb.BuildRequest {
	return &buildpb.BuildRequest{
		Inputs:       []*castorepb.Node{fileNode("aaaa-a"), fileNode("bbbb-b")},
		CommandArgs:  []string{"/nix/store/bbbb-b", "-c", "true"},
		WorkingDir:   "build",
		ScratchPaths: []string{"build", "nix/store"},
		InputsDir:    "nix/store",
		Outputs:      []string{"nix/store/zzzz-out", "nix/store/yyyy-dev"}, // Snix: name order, not path order
		EnvironmentVars: []*buildpb.BuildRequest_EnvVar{
			{Key: "HOME", Value: []byte("/homeless-shelter")},
			{Key: "out", Value: []byte("/nix/store/zzzz-out")},
		},
		Constraints:     &buildpb.BuildRequest_BuildConstraints{System: "x86_64-linux", ProvideBinSh: true},
		AdditionalFiles: []*buildpb.BuildRequest_AdditionalFile{{Path: "build/.attr-a"}, {Path: "build/.attr-b"}},
		RefscanNeedles:  []string{"zzzz", "aaaa"},
	}
}

func TestValidate(t *testing.T) {
	if err := Validate(nixRequest()); err != nil {
		t.Fatalf("a Nix request: %v", err)
	}
	for _, c := range []struct {
		name, want string
		edit       func(r *buildpb.BuildRequest)
	}{
		{"unsorted inputs", "sorted", func(r *buildpb.BuildRequest) { r.Inputs[0], r.Inputs[1] = r.Inputs[1], r.Inputs[0] }},
		{"duplicate inputs", "sorted and unique", func(r *buildpb.BuildRequest) { r.Inputs[1] = fileNode("aaaa-a") }},
		{"input name with slash", "inputs[1]", func(r *buildpb.BuildRequest) { r.Inputs[1] = fileNode("b/c") }},
		{"input digest", "digest", func(r *buildpb.BuildRequest) { r.Inputs[0].GetFile().Digest = []byte{1} }},
		{"no command", "command_args", func(r *buildpb.BuildRequest) { r.CommandArgs = nil }},
		{"working dir ..", "working_dir", func(r *buildpb.BuildRequest) { r.WorkingDir = "../x" }},
		{"absolute inputs dir", "inputs_dir", func(r *buildpb.BuildRequest) { r.InputsDir = "/nix/store" }},
		{"unsorted scratch", "scratch_paths", func(r *buildpb.BuildRequest) { r.ScratchPaths = []string{"nix/store", "build"} }},
		{"trailing slash", "outputs[0]", func(r *buildpb.BuildRequest) { r.Outputs[0] = "nix/store/x/" }},
		{"no outputs", "outputs", func(r *buildpb.BuildRequest) { r.Outputs = nil }},
		{"duplicate output", "twice", func(r *buildpb.BuildRequest) { r.Outputs[1] = r.Outputs[0] }},
		{"unsorted env", "sorted", func(r *buildpb.BuildRequest) {
			r.EnvironmentVars[0], r.EnvironmentVars[1] = r.EnvironmentVars[1], r.EnvironmentVars[0]
		}},
		{"env key with =", "'='", func(r *buildpb.BuildRequest) { r.EnvironmentVars[0].Key = "A=B" }},
		{"env value with NUL", "NUL", func(r *buildpb.BuildRequest) { r.EnvironmentVars[0].Value = []byte("a\x00") }},
		{"empty system", "constraints.system", func(r *buildpb.BuildRequest) { r.Constraints.System = "" }},
		{"relative ro path", "available_ro_paths", func(r *buildpb.BuildRequest) { r.Constraints.AvailableRoPaths = []string{"dev/kvm"} }},
		{"unsorted additional files", "additional_files[1]", func(r *buildpb.BuildRequest) {
			r.AdditionalFiles[0], r.AdditionalFiles[1] = r.AdditionalFiles[1], r.AdditionalFiles[0]
		}},
		{"empty needle", "refscan_needles", func(r *buildpb.BuildRequest) { r.RefscanNeedles[1] = "" }},
	} {
		r := proto.Clone(nixRequest()).(*buildpb.BuildRequest)
		c.edit(r)
		if err := Validate(r); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", c.name, err, c.want)
		}
	}
}

func TestIsHashPart(t *testing.T) {
	for s, want := range map[string]bool{
		"s1y78axx3ky46cgzv60pyry4irrlv0pl":  true,
		"s1y78axx3ky46cgzv60pyry4irrlv0p":   false, // 31
		"s1y78axx3ky46cgzv60pyry4irrlv0pe":  false, // e is not nix32
		"S1y78axx3ky46cgzv60pyry4irrlv0pl":  false,
		"s1y78axx3ky46cgzv60pyry4irrlv0plx": false,
	} {
		if isHashPart(s) != want {
			t.Errorf("isHashPart(%q) = %v", s, !want)
		}
	}
}

func TestPlainScanner(t *testing.T) {
	p := &plainScanner{needles: []string{"hello", "world", "absent"}, which: []int{0, 1, 2}, found: make([]bool, 3)}
	for _, chunk := range []string{"xxhel", "lo wor", "l", "d!"} { // needles across writes
		p.Write([]byte(chunk))
	}
	if !p.found[0] || !p.found[1] || p.found[2] {
		t.Fatalf("found %v", p.found)
	}
}
