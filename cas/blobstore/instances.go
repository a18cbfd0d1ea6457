package blobstore

// Stores are the content-addressable store and the action cache that serve
// one instance name.
type Stores struct {
	CAS BlobAccess
	AC  BlobAccess
}

// Instances routes instance names to stores. Instance names not listed in
// ByName share Default, so by default all instances share storage.
type Instances struct {
	Default Stores
	ByName  map[string]Stores
}

// For returns the stores of an instance name.
func (i *Instances) For(instance string) Stores {
	if s, ok := i.ByName[instance]; ok {
		return s
	}
	return i.Default
}
