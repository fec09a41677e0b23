package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// readInputs decodes every object in the named files (stdin when none is named).
func readInputs(paths []string, stdin io.Reader) ([]*unstructured.Unstructured, error) {
	if len(paths) == 0 {
		return decodeStream(stdin, "stdin")
	}
	var all []*unstructured.Unstructured
	for _, path := range paths {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		objs, err := decodeStream(f, path)
		_ = f.Close()
		if err != nil {
			return nil, err
		}
		all = append(all, objs...)
	}
	return all, nil
}

// decodeStream reads YAML documents (JSON is YAML) as the API server would hand them out:
// integers become int64, as in a live object. A List's items are returned one by one.
func decodeStream(r io.Reader, name string) ([]*unstructured.Unstructured, error) {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var out []*unstructured.Unstructured
	for doc := 1; ; doc++ {
		raw, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, doc, err)
		}
		data, err := yaml.YAMLToJSON(raw)
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, doc, err)
		}
		if trimmed := bytes.TrimSpace(data); len(trimmed) == 0 || bytes.Equal(trimmed, []byte("null")) {
			continue
		}
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(data); err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, doc, err)
		}
		if !obj.IsList() {
			out = append(out, obj)
			continue
		}
		list, err := obj.ToList()
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", name, doc, err)
		}
		for i := range list.Items {
			out = append(out, &list.Items[i])
		}
	}
}
