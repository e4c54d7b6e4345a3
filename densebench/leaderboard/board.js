// Sortable, filterable tables of the densebench leaderboard and report pages (inlined by page.py).
// Sorting: click a header; numbers sort best-first on the first click (largest first, or smallest first for a
// header with data-order="asc", e.g. an average rank), empty cells always last. A header the page was
// sorted by carries aria-sort, so the next click reverses it.
// Filters: <select data-filter=ATTR data-table=ID> keeps rows whose data-ATTR equals the choice;
// <select data-column-filter data-table=ID> shows only the columns of one benchmark.
(function(){
  function key(td, numeric){
    if(!td) return null;
    if(numeric){ var v = td.getAttribute('data-value'); return v === null ? null : parseFloat(v); }
    return td.textContent.trim().toLowerCase();
  }
  function sortBy(th){
    var table = th.closest('table'), tbody = table.tBodies[0];
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.getAttribute('data-type') === 'num';
    var current = th.getAttribute('aria-sort');
    var first = numeric && th.getAttribute('data-order') !== 'asc' ? 'descending' : 'ascending';
    var dir = current ? (current === 'ascending' ? 'descending' : 'ascending') : first;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function(r1, r2){
      var a = key(r1.cells[idx], numeric), b = key(r2.cells[idx], numeric);
      if(a === null && b === null) return 0;
      if(a === null) return 1;
      if(b === null) return -1;
      var c = a < b ? -1 : (a > b ? 1 : 0);
      return dir === 'ascending' ? c : -c;
    });
    rows.forEach(function(r){ tbody.appendChild(r); });
    th.parentNode.querySelectorAll('th').forEach(function(h){ h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
  }
  function applyFilters(table){
    var rowFilters = document.querySelectorAll('select[data-filter][data-table="' + table.id + '"]');
    var colSel = document.querySelector('select[data-column-filter][data-table="' + table.id + '"]');
    var col = colSel ? colSel.value : '';
    table.querySelectorAll('[data-bench]').forEach(function(c){
      c.hidden = col !== '' && c.getAttribute('data-bench') !== col;
    });
    Array.prototype.forEach.call(table.tBodies[0].rows, function(tr){
      var show = Array.prototype.every.call(rowFilters, function(s){
        return s.value === '' || tr.getAttribute('data-' + s.getAttribute('data-filter')) === s.value;
      });
      if(show && col !== ''){
        show = Array.prototype.some.call(tr.querySelectorAll('td[data-bench="' + col + '"]'), function(td){
          return td.hasAttribute('data-value');
        });
      }
      tr.hidden = !show;
    });
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('thead th').forEach(function(th){
      th.addEventListener('click', function(){ sortBy(th); });
    });
  });
  document.querySelectorAll('select[data-filter], select[data-column-filter]').forEach(function(s){
    s.addEventListener('change', function(){
      applyFilters(document.getElementById(s.getAttribute('data-table')));
    });
  });
})();
