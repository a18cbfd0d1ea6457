package translate

import (
	"fmt"
	"slices"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"tvixfarm/cas/digest"
)

// tree is a directory of the input root under construction: entries
// already in the CAS (done) and subdirectories still being built.
type tree struct {
	done  map[string]digest.Digest
	files map[string]File
	sub   map[string]*tree
}

func newTree() *tree {
	return &tree{done: map[string]digest.Digest{}, files: map[string]File{}, sub: map[string]*tree{}}
}

func (t *tree) dir(name string, d digest.Digest) { t.done[name] = d }

// file places f at the absolute path p, creating directories; it must not
// collide with anything already there.
func (t *tree) file(p string, f File) error {
	parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
	for _, c := range parts {
		if c == "" || c == "." || c == ".." {
			return fmt.Errorf("invalid path %q", p)
		}
	}
	for _, c := range parts[:len(parts)-1] {
		if _, ok := t.done[c]; ok {
			return fmt.Errorf("%q is inside a directory the sandbox makes itself", p)
		}
		if _, ok := t.files[c]; ok {
			return fmt.Errorf("%q is inside a file", p)
		}
		s, ok := t.sub[c]
		if !ok {
			s = newTree()
			t.sub[c] = s
		}
		t = s
	}
	name := parts[len(parts)-1]
	if _, ok := t.done[name]; ok {
		return fmt.Errorf("%q exists", p)
	}
	if _, ok := t.sub[name]; ok {
		return fmt.Errorf("%q exists", p)
	}
	t.files[name] = f
	return nil
}

// finish stores the directory and its subdirectories and returns its
// digest.
func (t *tree) finish(tr *translation) digest.Digest {
	dir := &repb.Directory{}
	for name, d := range t.done {
		dir.Directories = append(dir.Directories, &repb.DirectoryNode{Name: name, Digest: d.Proto()})
	}
	for name, s := range t.sub {
		dir.Directories = append(dir.Directories, &repb.DirectoryNode{Name: name, Digest: s.finish(tr).Proto()})
	}
	for name, f := range t.files {
		dir.Files = append(dir.Files, &repb.FileNode{Name: name, Digest: f.Digest.Proto(), IsExecutable: f.Executable})
	}
	slices.SortFunc(dir.Directories, func(a, b *repb.DirectoryNode) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(dir.Files, func(a, b *repb.FileNode) int { return strings.Compare(a.Name, b.Name) })
	return tr.put(dir)
}
